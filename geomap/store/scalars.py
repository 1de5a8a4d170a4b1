"""Per-state scalars beside the vectors, and reads of one prompt's rows that open only the files holding it.

The trajectory views (``trajectory``, ``layer_curves``, ``position_stats``) need a state's key and its two scalars
(``norm``, ``cos_final``), never its vector. They read them from ``internal.state_scalars``:

- in a ``rows`` store, a view over ``states`` (nothing is stored twice; the plans are those of ``states``);
- in a ``segments`` store, a DuckDB table holding those columns for every row of the ``states`` view. Rows are
  inserted in the transaction that catalogs their ``states`` segment (`insert`), and a store written before the
  table existed is backfilled from its segments in one transaction when its schema is next ensured (`ensure`).
  So a trajectory touches no segment file: the ``states`` view is one ``read_parquet`` over every file of the
  catalog, and DuckDB opens each file's footer before it can skip it.

Code that geomap runs (never user SQL) can also read one prompt's vector rows from only the segment files whose
prompt range holds it (`of_prompt`), instead of the view over every file.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from geomap.faults import kill_point
from geomap.lru import Lru

COLUMNS = ("id", "prompt_id", "pos", "layer", "norm", "cos_final")
RELATION = "internal.state_scalars"
TABLE_DDL = f"""CREATE TABLE IF NOT EXISTS {RELATION} (  -- segments layout: the scalars of every state
    id BIGINT, prompt_id INTEGER, pos INTEGER, layer SMALLINT, norm FLOAT, cos_final FLOAT)"""
VIEW_DDL = f"CREATE OR REPLACE VIEW {RELATION} AS SELECT {', '.join(COLUMNS)} FROM main.states"
_SELECT = ", ".join(COLUMNS)
READY = "state_scalars"  # the ``store_meta`` key saying ``internal.state_scalars`` exists, so a reader asks cheaply
_TYPES: Lru[list] = Lru(64)  # bounded: a segment table's columns and types, per store file and schema digest


def _kind(con: duckdb.DuckDBPyConnection) -> str | None:
    """``BASE TABLE`` or ``VIEW`` for ``internal.state_scalars``, None when the store has none yet."""
    found = con.execute("SELECT table_type FROM information_schema.tables WHERE table_schema = 'internal' AND "
                        "table_name = 'state_scalars' AND table_catalog = current_database()").fetchall()
    return found[0][0] if found else None


def ensure(con: duckdb.DuckDBPyConnection, layout: str) -> None:
    """Create ``internal.state_scalars`` for the store's layout; backfill a segments store that lacks it.

    The segments table is created and filled from the ``states`` view (its segments and ``internal.states_rows``)
    in one transaction with the ``store_meta`` key `READY`, so a kill leaves either no table (the next writer
    backfills again) or a full one.
    """
    mark = f"INSERT INTO store_meta VALUES ('{READY}', ?) ON CONFLICT DO NOTHING"
    if layout != "segments":
        con.execute(VIEW_DDL)
        con.execute(mark, [layout])
        return
    kind = _kind(con)
    if kind == "BASE TABLE":
        con.execute(mark, [layout])
        return
    from geomap.store.db import in_transaction

    with in_transaction(con):
        if kind == "VIEW":
            con.execute(f"DROP VIEW {RELATION}")
        con.execute(TABLE_DDL)
        con.execute(f"INSERT INTO {RELATION} SELECT {_SELECT} FROM states ORDER BY prompt_id, pos, layer")  # noqa: S608
        con.execute(f"DELETE FROM store_meta WHERE key = '{READY}'")
        con.execute(mark, [layout])
        kill_point("scalars.backfilled")


def insert(con: duckdb.DuckDBPyConnection, states: pa.Table) -> None:
    """Insert the scalars of a batch's ``states`` rows (inside the transaction that catalogs their segment)."""
    con.register("_geomap_scalars", states.select(list(COLUMNS)))
    try:
        con.execute(f"INSERT INTO {RELATION} SELECT {_SELECT} FROM _geomap_scalars")  # noqa: S608 (fixed names)
    finally:
        con.unregister("_geomap_scalars")


def relation(con: duckdb.DuckDBPyConnection) -> str:
    """What to read a state's key and scalars from: ``internal.state_scalars``, else ``states``.

    ``states`` in a store whose schema was not ensured since the relation existed (opened read-only, never written
    by this version of geomap).
    """
    found = con.execute("SELECT count(*) FROM store_meta WHERE key = ?", [READY]).fetchall()[0][0]
    return RELATION if found else "states"


def of_prompt(con: duckdb.DuckDBPyConnection, name: str, prompt_id: int) -> str:
    """SQL for after ``FROM``: table ``name``'s rows, reading only the segment files that may hold ``prompt_id``.

    The files are picked by the catalog's prompt ranges; columns are typed as the view types them. The caller still
    filters on the prompt. In a ``rows`` store, and for tables that are not segment tables, it is the table's own
    name.
    """
    from geomap.store import segments

    meta = dict(con.execute("SELECT key, value FROM store_meta WHERE key IN ('layout', 'schema_sha256')").fetchall())
    if name not in segments.SEGMENT_TABLES or meta.get("layout") != "segments":
        return name
    path, files = con.execute(
        "SELECT (SELECT path FROM duckdb_databases() WHERE database_name = current_database()), "
        "(SELECT list(file ORDER BY min_prompt, file) FROM internal.segments WHERE table_name = ? AND "
        "min_prompt <= ? AND max_prompt >= ?)", [name, int(prompt_id), int(prompt_id)]).fetchall()[0]
    columns = _TYPES.get_or_put((path, name, meta.get("schema_sha256")),
                                lambda: segments.segment_columns(con, name))
    return f"({segments.refresh_sql(con, name, files or [], columns, segments.segment_dir(path))})"

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

COLUMNS = ("id", "prompt_id", "pos", "layer", "norm", "cos_final")
RELATION = "internal.state_scalars"
TABLE_DDL = f"""CREATE TABLE IF NOT EXISTS {RELATION} (  -- segments layout: the scalars of every state
    id BIGINT, prompt_id INTEGER, pos INTEGER, layer SMALLINT, norm FLOAT, cos_final FLOAT)"""
VIEW_DDL = f"CREATE OR REPLACE VIEW {RELATION} AS SELECT {', '.join(COLUMNS)} FROM main.states"
_SELECT = ", ".join(COLUMNS)


def _kind(con: duckdb.DuckDBPyConnection) -> str | None:
    """``BASE TABLE`` or ``VIEW`` for ``internal.state_scalars``, None when the store has none yet."""
    found = con.execute("SELECT table_type FROM information_schema.tables WHERE table_schema = 'internal' AND "
                        "table_name = 'state_scalars' AND table_catalog = current_database()").fetchall()
    return found[0][0] if found else None


def ensure(con: duckdb.DuckDBPyConnection, layout: str) -> None:
    """Create ``internal.state_scalars`` for the store's layout; backfill a segments store that lacks it.

    The segments table is created and filled from the ``states`` view (its segments and ``internal.states_rows``)
    in one transaction, so a kill leaves either no table (the next writer backfills again) or a full one.
    """
    if layout != "segments":
        con.execute(VIEW_DDL)
        return
    kind = _kind(con)
    if kind == "BASE TABLE":
        return
    from geomap.store.db import in_transaction

    with in_transaction(con):
        if kind == "VIEW":
            con.execute(f"DROP VIEW {RELATION}")
        con.execute(TABLE_DDL)
        con.execute(f"INSERT INTO {RELATION} SELECT {_SELECT} FROM states ORDER BY prompt_id, pos, layer")  # noqa: S608
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

    ``states`` in a store whose schema was not ensured since the table existed (opened read-only, never written by
    this version of geomap).
    """
    return RELATION if _kind(con) else "states"


def of_prompt(con: duckdb.DuckDBPyConnection, name: str, prompt_id: int) -> str:
    """SQL for after ``FROM``: table ``name``'s rows, reading only the segment files that may hold ``prompt_id``.

    The files are picked by the catalog's prompt ranges; columns are typed as the view types them. The caller still
    filters on the prompt. In a ``rows`` store, and for tables that are not segment tables, it is the table's own name.
    """
    from geomap.store.segments import SEGMENT_TABLES, layout, refresh_sql

    if name not in SEGMENT_TABLES or layout(con) != "segments":
        return name
    files = [r[0] for r in con.execute("SELECT file FROM internal.segments WHERE table_name = ? AND min_prompt <= ? "
                                       "AND max_prompt >= ? ORDER BY min_prompt, file",
                                       [name, int(prompt_id), int(prompt_id)]).fetchall()]
    return f"({refresh_sql(con, name, files)})"

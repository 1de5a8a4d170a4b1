"""Moving a ``rows`` store's vectors into segments (`geomap store migrate`), without losing a row.

The store switches layout first (its vector tables become ``internal.<name>_rows``, read by views of their names), then
the rows move into segment files a few hundred prompts at a time, each step one transaction.
"""

from __future__ import annotations

import duckdb

from geomap.faults import kill_point
from geomap.store import scalars
from geomap.store.db import ensure_schema, in_transaction, rollback_quietly
from geomap.store.segments import (
    CATALOG_DDL,
    SEGMENT_TABLES,
    Extent,
    catalog,
    layout,
    refresh_views,
    segment_columns,
    segment_dir,
    store_path,
    write_segment,
)


def migrate(con: duckdb.DuckDBPyConnection, prompts_per_segment: int = 256) -> dict[str, int]:
    """Move a store's vector rows into segments (switching a ``rows`` store to the ``segments`` layout first).

    Runs in steps of ``prompts_per_segment`` prompts, each one transaction (segment written, catalog row, rows
    deleted from the ``_rows`` table, view rewritten), so a kill loses nothing and a rerun carries on. Every value is
    kept bit for bit: the segment holds the very rows DuckDB held.

    Returns:
        Rows moved per table.
    """
    if layout(con) != "segments":
        switch_layout(con)
        ensure_schema(con)
    moved: dict[str, int] = {}
    folder = segment_dir(store_path(con))
    for name in SEGMENT_TABLES:
        if not segment_columns(con, name):
            continue
        while True:
            first = con.execute(f"SELECT min(prompt_id) FROM internal.{name}_rows").fetchall()[0][0]  # noqa: S608
            if first is None:
                break
            last = con.execute(f"SELECT max(prompt_id) FROM (SELECT DISTINCT prompt_id FROM internal.{name}_rows "  # noqa: S608
                               f"ORDER BY prompt_id LIMIT ?)", [prompts_per_segment]).fetchall()[0][0]
            with in_transaction(con):
                table = con.sql(f"SELECT * FROM internal.{name}_rows WHERE prompt_id BETWEEN ? AND ?",  # noqa: S608
                                params=[first, last]).to_arrow_table()
                segment = write_segment(table, name, folder)
                catalog(con, name, segment, Extent.of(table, name))
                con.execute(f"DELETE FROM internal.{name}_rows WHERE prompt_id BETWEEN ? AND ?", [first, last])  # noqa: S608
                refresh_views(con, [name])
                kill_point("segment.migrated")
            moved[name] = moved.get(name, 0) + table.num_rows
    con.execute("CHECKPOINT")
    return moved


def switch_layout(con: duckdb.DuckDBPyConnection) -> None:
    """Turn a ``rows`` store into a ``segments`` one, in one transaction.

    Its vector tables move to ``internal.<name>_rows`` (views of the same names replace them when the schema is next
    ensured); the rows stay in DuckDB until `migrate` moves them into segments.
    """
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(CATALOG_DDL)
        con.execute("DROP VIEW IF EXISTS trajectory")
        con.execute(f"DROP VIEW IF EXISTS {scalars.RELATION}")  # a table of that name replaces it (`scalars.ensure`)
        con.execute(f"DELETE FROM store_meta WHERE key = '{scalars.READY}'")
        for name in SEGMENT_TABLES:
            kind = con.execute("SELECT table_type FROM information_schema.tables WHERE table_name = ? AND "
                               "table_schema = 'main' AND table_catalog = current_database()", [name]).fetchall()
            if kind and kind[0][0] == "BASE TABLE":
                con.execute(f"CREATE TABLE internal.{name}_rows AS SELECT * FROM main.{name}")  # noqa: S608
                con.execute(f"DROP TABLE main.{name}")
        con.execute("DELETE FROM store_meta WHERE key IN ('layout', 'schema_sha256')")
        con.execute("INSERT INTO store_meta VALUES ('layout', 'segments')")
        con.execute("COMMIT")
    except BaseException:
        rollback_quietly(con)
        raise

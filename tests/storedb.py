"""Read a test store directly, with DuckDB, independently of geomap's own readers."""

from __future__ import annotations

import duckdb


def rows(db, sql: str, *params) -> list[tuple]:
    """The rows of one query on a read-only connection to ``db``."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()

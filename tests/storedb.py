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


def copy_store(src, dst, indexes: bool = False) -> None:
    """Copy a store: its DuckDB file, its segment folder when it has one, and its FAISS indexes if asked."""
    import shutil

    from geomap.store.db import index_dir
    from geomap.store.segments import segment_dir

    shutil.copy(src, dst)
    if segment_dir(src).is_dir():
        shutil.copytree(segment_dir(src), segment_dir(dst))
    if indexes:
        shutil.copytree(index_dir(src), index_dir(dst))

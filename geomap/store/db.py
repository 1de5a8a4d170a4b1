"""Opening a geomap store: a DuckDB file (source of truth) and its folder of derived FAISS indexes."""

from __future__ import annotations

import os
import re
from importlib.resources import files
from pathlib import Path

import duckdb

from geomap.errors import GeomapError

SCHEMA_VERSION = "1"
_MARKER = "-- @@ vector tables @@"


class StoreError(GeomapError):
    """The store cannot be opened or used as asked."""


class StoreLockedError(StoreError):
    """Another process holds the store's write lock."""


def default_db_path() -> Path:
    """``$GEOMAP_DB``, else ``data/geomap.duckdb``."""
    return Path(os.environ.get("GEOMAP_DB") or "data/geomap.duckdb")


def schema_parts() -> tuple[str, str]:
    """The schema file's static part and its vector-table template (with ``{d}``)."""
    text = files("geomap.store").joinpath("schema.sql").read_text()
    static, vectors = text.split(_MARKER)
    return static, vectors


def index_dir(db_path: Path) -> Path:
    """Folder of a store's FAISS indexes: ``<db stem>.indexes`` beside the DuckDB file."""
    return db_path.with_name(db_path.stem + ".indexes")


def connect(db_path: str | Path, read_only: bool = False, config: dict | None = None) -> duckdb.DuckDBPyConnection:
    """Connect to a store's DuckDB file, turning lock conflicts into a clear `StoreLockedError`."""
    path = Path(db_path)
    if read_only and not path.exists():
        raise StoreError(f"No store at {path}; create one with `geomap run` or `geomap ingest`.")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return duckdb.connect(str(path), read_only=read_only, config=config or {})
    except duckdb.IOException as exc:
        message = str(exc)
        if "lock" in message.lower():
            holder = re.search(r"\(PID (\d+)\)", message)
            who = f"process {holder.group(1)}" if holder else "another process"
            raise StoreLockedError(
                f"The store {path} is locked by {who}, which is writing to it. Wait for it to finish, or use "
                "another --db."
            ) from None
        raise StoreError(f"Cannot open store {path}: {message}") from None
    except duckdb.ConnectionException as exc:
        raise StoreError(f"Cannot open store {path}: this process already has it open with other settings "
                         f"({exc}). Close that connection first.") from None


def ensure_schema(con: duckdb.DuckDBPyConnection, d_model: int | None = None) -> int | None:
    """Create the static tables, and the vector and analysis tables once the store's width is known.

    Every statement is idempotent, so opening an older store adds the tables and views it lacks.

    Returns:
        The store's residual width, or None while no run has fixed it.

    Raises:
        StoreError: ``d_model`` differs from the width the store already holds.
    """
    static, vectors = schema_parts()
    con.execute(static)
    rows = con.execute("SELECT value FROM store_meta WHERE key = 'd_model'").fetchall()
    stored = int(rows[0][0]) if rows else None
    if stored is not None and d_model is not None and stored != d_model:
        raise StoreError(f"This store holds vectors of width {stored}; a model of width {d_model} needs another --db.")
    width = stored if stored is not None else d_model
    if width is None:
        return None
    con.execute(vectors.replace("{d}", str(int(width))))
    con.execute(files("geomap.store").joinpath("analysis.sql").read_text())
    if stored is None:
        con.execute("INSERT INTO store_meta VALUES ('d_model', ?), ('schema_version', ?)",
                    [str(width), SCHEMA_VERSION])
    return width

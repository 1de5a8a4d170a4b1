"""Opening a geomap store: a DuckDB file (source of truth) and its folder of derived FAISS indexes."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

import duckdb

from geomap.errors import GeomapError

SCHEMA_VERSION = "1"
WRITE_CHECKPOINT_THRESHOLD = "256MB"  # WAL size that triggers a checkpoint while ingesting (DuckDB's default: 16MB)
_MARKER = "-- @@ vector tables @@"
_VIEWS = "-- Views:"


class StoreError(GeomapError):
    """The store cannot be opened or used as asked."""


class NotFoundError(StoreError):
    """What was asked for is not in the store (no such store, run, prompt, state, projection, ...)."""

    http_status = 404


class StoreLockedError(StoreError):
    """Another process holds the store's write lock."""


class StorageError(StoreError):
    """The disk refused a write (full, read-only, or gone): the message names the cause and the path."""


def rollback_quietly(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back the open transaction, if any, without raising over the error that led here.

    A failed COMMIT (a full disk, say) has already ended the transaction, and DuckDB then refuses a ROLLBACK with
    "no transaction is active"; that second error must never hide the first.
    """
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


@contextmanager
def in_transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """One transaction on ``con``: committed when the block ends, rolled back (quietly) if it raises."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        rollback_quietly(con)
        raise
    con.execute("COMMIT")


def storage_error(exc: BaseException, path: str | Path) -> StorageError | None:
    """The one-line `StorageError` for a write the disk refused (no space, read-only, I/O error), else None."""
    import errno

    text = str(exc)
    causes = ("No space left on device", "Read-only file system", "Permission denied", "Input/output error",
              "Disk quota exceeded")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
        cause = exc.strerror or text
        where = exc.filename or path
    elif (cause := next((c for c in causes if c.lower() in text.lower()), None)) is not None:
        where = path  # DuckDB's IOException, or an OSError raised inside a FAISS writer callback
    else:
        return None
    hint = " Free some space and rerun the same command: it resumes." if "space" in cause.lower() else ""
    return StorageError(f"Cannot write {where}: {cause}.{hint}")


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


def _server_holding(path: Path, pid: int | None) -> str | None:
    """When the lock's holder is geomap's own server for this store (its ``<db>.serve.json``), one line saying so."""
    import json

    resolved = path.resolve()
    try:
        info = json.loads(resolved.with_name(resolved.name + ".serve.json").read_text(encoding="utf-8"))
        server_pid, url = int(info["pid"]), str(info["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid is not None and pid != server_pid:
        return None
    return (f"The store {path} is served by geomap's own server at {url} (pid {server_pid}), which holds its file: "
            f"this command does not go through the server yet; stop the server (kill {server_pid}) and run it "
            "again, or query it through `geomap sql` or the server's API.")


def connect(db_path: str | Path, read_only: bool = False, config: dict | None = None,
            cache_files: bool = True) -> duckdb.DuckDBPyConnection:
    """Open a DuckDB instance of a store's file, turning lock conflicts into a clear `StoreLockedError`.

    The stages open stores through `geomap.store.handle.Store`, which owns what this returns. ``cache_files`` false
    leaves segment files' blocks out of DuckDB's buffer pool: an instance for one query under a small memory limit
    (`geomap.store.sql.open_reader`) gains nothing from them, and with them a join over the segment views ran out of
    export's 32 MB (DuckDB 2.0.1).
    """
    path = Path(db_path)
    if read_only and not path.exists():
        raise NotFoundError(f"No store at {path}; create one with `geomap run` or `geomap ingest`.")
    path.parent.mkdir(parents=True, exist_ok=True)
    config = dict(config or {})
    locked = config.get("enable_external_access") is False
    if locked:  # set after connecting, in the one order DuckDB accepts (see `_lock_down`)
        config.pop("enable_external_access")
        config.pop("lock_configuration", None)
    try:
        con = duckdb.connect(str(path), read_only=read_only, config=config)
    except duckdb.IOException as exc:
        message = str(exc)
        if "lock" in message.lower():
            holder = re.search(r"\(PID (\d+)\)", message)
            served_by = _server_holding(path, int(holder.group(1)) if holder else None)
            if served_by is not None:
                raise StoreLockedError(served_by) from None
            who = f"process {holder.group(1)}" if holder else "another process"
            raise StoreLockedError(
                f"The store {path} is locked by {who}, which is writing to it. Wait for it to finish, or use "
                "another --db."
            ) from None
        raise StoreError(f"Cannot open store {path}: {message}") from None
    except duckdb.ConnectionException as exc:
        raise StoreError(f"Cannot open store {path}: this process already has it open with other settings "
                         f"({exc}). Close that connection first.") from None
    if not con.execute("SELECT current_setting('lock_configuration')").fetchall()[0][0]:
        # Segment files never change under their names (a new file gets a new random name), so DuckDB may keep
        # their footers and blocks without checking them again: a query over 500 segments in about a third of the time
        con.execute("SET parquet_metadata_cache = true")
        con.execute(f"SET cache_local_files = {str(cache_files).lower()}")
        con.execute("SET validate_external_file_cache = 'NO_VALIDATION'")
    from geomap.store.segments import views_here

    views_here(con, path, persist=not read_only)  # a store copied or moved with its folder names the old one
    if locked:
        _lock_down(con, path)
    return con


def _lock_down(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """No file access but the store's segment folder (read through its views), and settings locked.

    DuckDB takes these in one order only: the allowed directory first, then external access off, then the lock.
    User SQL can then neither name a file (the parse-time guard refuses file functions too) nor loosen a setting.
    """
    from geomap.store.segments import segment_dir

    if con.execute("SELECT current_setting('lock_configuration')").fetchall()[0][0]:
        return  # another connection of this process already locked the shared instance down
    con.execute("SET allowed_directories = ?", [[str(segment_dir(path)) + os.sep]])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


INGEST_MEMORY = "1GB"  # DuckDB's memory cap while ingesting, unless $GEOMAP_INGEST_MEMORY says otherwise


def writer_settings(con: duckdb.DuckDBPyConnection) -> None:
    """Set a writing instance up for ingestion: deferred checkpoints and a memory cap (both instance-wide).

    - Checkpoints wait for `WRITE_CHECKPOINT_THRESHOLD` of write-ahead log. With DuckDB's 16MB default an ingestion
      checkpoints after every batch and recompresses the open row groups each time; every commit is still durable.
    - DuckDB's memory is capped at ``$GEOMAP_INGEST_MEMORY`` (default `INGEST_MEMORY`; any DuckDB size such as
      ``512MB`` or ``4GB``). Without a cap DuckDB keeps written blocks cached up to 80% of the machine's memory, so
      an ingestion's memory grew with every prompt. Under the cap it evicts them (they are on disk already).

    A served store (``geomap serve``) is given both in its configuration when it opens (`Store.prepare_writer`).
    """
    con.execute(f"SET checkpoint_threshold = '{WRITE_CHECKPOINT_THRESHOLD}'")
    limit = os.environ.get("GEOMAP_INGEST_MEMORY", INGEST_MEMORY)
    try:
        con.execute("SET memory_limit = ?", [limit])
    except duckdb.Error as exc:
        raise StoreError(f"GEOMAP_INGEST_MEMORY={limit!r} is not a memory size DuckDB accepts (e.g. 512MB, 2GB): "
                         f"{str(exc).splitlines()[0]}") from None


def ensure_schema(con: duckdb.DuckDBPyConnection, d_model: int | None = None, layout: str | None = None) -> int | None:
    """Create the static tables, and the vector and analysis tables once the store's width is known.

    Every statement is idempotent, so opening an older store adds the tables and views it lacks. A new store gets
    ``layout`` (``rows`` or ``segments``, see `geomap.store.segments`), else ``$GEOMAP_STORE_LAYOUT``'s; a store
    keeps the layout it was created with until `geomap.store.segment_migrate.migrate` moves it.

    Returns:
        The store's residual width, or None while no run has fixed it.

    Raises:
        StoreError: ``d_model`` differs from the width the store already holds.
    """
    from geomap.store import scalars, segments

    static, vectors = schema_parts()
    analysis = files("geomap.store").joinpath("analysis.sql").read_text()
    meta = dict(_meta(con))
    stored = int(meta["d_model"]) if "d_model" in meta else None
    layout = meta.get("layout") or ("rows" if stored is not None else layout or segments.new_store_layout())
    own = segments.CATALOG_DDL + scalars.TABLE_DDL + scalars.VIEW_DDL + scalars.READY
    digest = hashlib.sha256((static + vectors + analysis + own + layout).encode()).hexdigest()
    if stored is not None and d_model is not None and stored != d_model:
        raise StoreError(f"This store holds vectors of width {stored}; a model of width {d_model} needs another --db.")
    if stored is not None and meta.get("schema_sha256") == digest:
        return stored  # this exact schema is in place: no DDL (concurrent cursors of a served store never race on it)
    con.execute(segments.CATALOG_DDL)
    con.execute(static if layout == "rows" else segments.rows_ddl(static))
    if "layout" not in meta:
        con.execute("INSERT INTO store_meta VALUES ('layout', ?)", [layout])
    _migrate(con)
    width = stored if stored is not None else d_model
    if width is None:
        return None
    vectors = vectors.replace("{d}", str(int(width)))
    tables, views = vectors.split(_VIEWS)
    if layout == "rows":
        con.execute(tables)
    else:  # the vector tables as `<name>_rows`, the views of their names over those and the segments
        con.execute(segments.rows_ddl(tables))
        segments.refresh_views(con)
    scalars.ensure(con, layout)  # what the trajectory views read: a view over states, or a table beside segments
    con.execute(_VIEWS + views)
    con.execute(analysis)
    if stored is None:
        con.execute("INSERT INTO store_meta VALUES ('d_model', ?), ('schema_version', ?)",
                    [str(width), SCHEMA_VERSION])
    con.execute("DELETE FROM store_meta WHERE key = 'schema_sha256'")
    con.execute("INSERT INTO store_meta VALUES ('schema_sha256', ?)", [digest])
    return width


def _migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Bring a store written by an older geomap up to the schema (columns added since; idempotent)."""
    from geomap.store import facts

    _migrate_final_logits(con)
    con.execute("ALTER TABLE lens_stats ADD COLUMN IF NOT EXISTS top1_token VARCHAR")
    con.execute("""UPDATE lens_stats SET top1_token = v.text FROM prompts p, runs r, vocab v
                   WHERE lens_stats.top1_token IS NULL AND p.id = lens_stats.prompt_id AND r.id = p.run_id
                     AND v.weights_sha256 = r.weights_sha256 AND v.token_id = lens_stats.top1_id""")
    facts.migrate(con)  # facts stored before their answer's text and kind were facts
    facts.fill(con)  # journeys stored before `journey_facts` existed


def _migrate_final_logits(con: duckdb.DuckDBPyConnection) -> None:
    """Split the one-row-per-prompt ``final_logits`` of older stores into rows of 4096 ids, in one transaction.

    A megabyte-sized list per row made every checkpoint pin the row group's values in memory, so a memory cap
    failed the checkpoint; 16 kB rows do not. Every logit is kept: the new rows hold them bit for bit.
    """
    columns = {r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'final_logits' "
                                         "AND database_name = current_database() AND schema_name = 'main'").fetchall()}
    if not columns or "chunk" in columns:
        return
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("ALTER TABLE final_logits RENAME TO final_logits_v1")
        con.execute("CREATE TABLE final_logits (prompt_id INTEGER, chunk SMALLINT, logits FLOAT[4096])")
        con.execute("""INSERT INTO final_logits
                       SELECT prompt_id, c::SMALLINT,
                              list_resize(logits[c * 4096 + 1 : (c + 1) * 4096], 4096, 'NaN'::FLOAT)::FLOAT[4096]
                       FROM final_logits_v1, range(0, (len(logits) + 4095) // 4096) t(c)
                       WHERE logits IS NOT NULL ORDER BY prompt_id, c""")
        con.execute("DROP TABLE final_logits_v1")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _meta(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """The store's ``store_meta`` pairs; none before the table exists."""
    if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'store_meta' "
                       "AND database_name = current_database() AND schema_name = 'main'").fetchall()[0][0]:
        return []
    return con.execute("SELECT key, value FROM store_meta").fetchall()

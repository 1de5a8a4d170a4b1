"""Vector segments: the bulk vector tables as Parquet files in the store's segment folder, read through views.

In a store whose layout is ``segments`` (``store_meta.layout``; every new store's unless ``$GEOMAP_STORE_LAYOUT`` is
``rows``), the rows of `SEGMENT_TABLES` are written (`geomap.store.parquet_fast`) as immutable Parquet files in
``<db stem>.segments/`` beside the DuckDB file, one file per table per merged batch. A store keeps the layout it was
created with: a ``rows`` store (older, or asked for) keeps its vectors in DuckDB tables until it is migrated.
DuckDB keeps the catalog (``internal.segments``: file, table, sha256, rows, prompt-id range, format) and reads the
files through a view under each table's usual name, which casts every column back to its schema type (pyarrow's
FixedSizeList reads as ``FLOAT[]``; the view makes it ``FLOAT[d]`` again). Rows written before the switch stay in a
``internal.<table>_rows`` DuckDB table that the same view unions in, until `geomap.store.segment_migrate` moves them.
The states' scalars are also kept in a DuckDB table, written in the same commit (`geomap.store.scalars`).

Durability follows the store's rule (`geomap.store.files`): a segment is written under a temporary name, fsynced
and renamed, inside the transaction of the batch it belongs to; its catalog row and the view that names it commit
with the batch's metadata rows. A segment whose transaction never committed is an orphan, removed by
`remove_orphans` the next time the store is opened for writing. Compaction writes the merged segment the same way
and retires the old files in the same commit; retired files are deleted only when no reader of this process can
still be reading them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geomap.faults import kill_point
from geomap.store import scalars
from geomap.store.files import fsync_path, write_temp
from geomap.store.parquet_fast import write_parquet

SEGMENT_TABLES = ("states", "contributions", "attention", "final_logits")
SORT_KEYS = {"states": ("prompt_id", "pos", "layer"), "contributions": ("prompt_id", "pos", "layer"),
             "attention": ("prompt_id", "pos", "layer", "head"), "final_logits": ("prompt_id", "chunk")}
SEGMENT_FORMAT = 1
LAYOUTS = ("rows", "segments")
LAYOUT_ENV = "GEOMAP_STORE_LAYOUT"  # the layout a new store gets (default `DEFAULT_LAYOUT`)
DEFAULT_LAYOUT = "segments"
ROW_GROUP_BYTES = 4 << 20  # about 4 MB a row group (see `write_segment`)
RETIRE_GRACE_S = 600.0  # seconds a retired segment outlives its retirement when readers may share the instance
PACKED = frozenset(SEGMENT_TABLES)  # tables whose float vectors are stored as zstd'd byte streams

CATALOG_DDL = """
CREATE SCHEMA IF NOT EXISTS internal;      -- the store's own bookkeeping, apart from the documented tables
CREATE TABLE IF NOT EXISTS internal.segments (       -- vector segments: Parquet files of the store's segment folder
    file VARCHAR PRIMARY KEY,               -- name inside the segment folder
    table_name VARCHAR,                     -- the view it belongs to: states, contributions, attention, final_logits
    rows BIGINT,
    bytes BIGINT,
    sha256 VARCHAR,
    min_prompt INTEGER,
    max_prompt INTEGER,
    max_id BIGINT,                          -- states: the largest state id it holds
    format INTEGER,                         -- segment format version
    created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS internal.retired_segments (  -- replaced by compaction or migration; deleted later
    file VARCHAR PRIMARY KEY,
    retired_at TIMESTAMP
);
"""


@dataclass(frozen=True)
class Segment:
    """A written segment file: its name in the folder, rows, bytes and sha256."""

    file: str
    rows: int
    bytes: int
    sha256: str


def segment_dir(db_path: str | Path) -> Path:
    """Folder of a store's vector segments: ``<db stem>.segments`` beside the DuckDB file."""
    path = Path(db_path).resolve()
    return path.with_name(path.stem + ".segments")


def store_path(con: duckdb.DuckDBPyConnection) -> Path:
    """The DuckDB file a connection has open."""
    return Path(con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()")
                .fetchall()[0][0])


def layout(con: duckdb.DuckDBPyConnection) -> str:
    """The store's layout: ``segments`` when its vectors live in segment files, else ``rows``."""
    try:
        rows = con.execute("SELECT value FROM store_meta WHERE key = 'layout'").fetchall()
    except duckdb.CatalogException:
        return "rows"
    return rows[0][0] if rows else "rows"


def new_store_layout() -> str:
    """The layout a store created now gets: ``$GEOMAP_STORE_LAYOUT``, else `DEFAULT_LAYOUT`."""
    value = os.environ.get(LAYOUT_ENV, DEFAULT_LAYOUT)
    if value not in LAYOUTS:
        from geomap.store.db import StoreError

        raise StoreError(f"{LAYOUT_ENV}={value!r} is not a store layout; use one of {', '.join(LAYOUTS)}.")
    return value


def rows_ddl(ddl: str) -> str:
    """Schema DDL with each segment table's ``CREATE TABLE`` renamed to its ``<table>_rows`` table."""
    for name in SEGMENT_TABLES:
        ddl = ddl.replace(f"CREATE TABLE IF NOT EXISTS {name} (", f"CREATE TABLE IF NOT EXISTS internal.{name}_rows (")
    return ddl


def key_order(table: pa.Table, name: str) -> np.ndarray | None:
    """The permutation that puts a table's rows in segment order (`SORT_KEYS`), or None when they are in it."""
    keys = [k for k in SORT_KEYS[name] if k in table.column_names]
    order = np.lexsort([table.column(k).to_numpy() for k in reversed(keys)])
    return None if (order == np.arange(len(order))).all() else order


def _sorted(table: pa.Table, name: str) -> pa.Table:
    """The rows in key order; vectors are scattered straight from their chunks with numpy (one copy, not two)."""
    order = key_order(table, name)
    if order is None:
        return table
    where = np.empty_like(order)
    where[order] = np.arange(len(order))  # the sorted position of every row
    columns = []
    for column in table.columns:
        kind = column.type
        if not pa.types.is_fixed_size_list(kind) or any(c.values.null_count for c in column.chunks):
            columns.append(column.combine_chunks().take(pa.array(order)))
            continue
        width = kind.list_size
        out = np.empty((len(order), width), np.dtype(kind.value_type.to_pandas_dtype()))
        valid = np.ones(len(order), bool)
        start = 0
        for chunk in column.chunks:
            rows = where[start:start + len(chunk)]
            out[rows] = chunk.values.slice(chunk.offset * width, len(chunk) * width).to_numpy().reshape(-1, width)
            if chunk.null_count:
                valid[rows] = np.asarray(chunk.is_valid())
            start += len(chunk)
        mask = None if valid.all() else pa.array(~valid)
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1)), width, mask=mask))
    return pa.table(columns, schema=table.schema)


def group_rows(nbytes: int, rows: int) -> int:
    """Rows per row group for a table of ``rows`` rows and ``nbytes`` bytes in memory: about `ROW_GROUP_BYTES`."""
    return max(64, ROW_GROUP_BYTES // max(nbytes // max(rows, 1), 1))


def statistics_for(name: str, column_names: Sequence[str]) -> list[str]:
    """The columns of table ``name`` whose row groups carry min/max statistics (its sort keys and state ids)."""
    return [k for k in (*SORT_KEYS[name], "id") if k in column_names]


def write_segment(table: pa.Table, name: str, folder: Path, sync_folder: bool = True) -> Segment:
    """Write a table's rows as a new segment file of ``folder``: sorted, fsynced and renamed into place.

    Rows are sorted by (prompt, position, layer) and cut into row groups of about `ROW_GROUP_BYTES`, so a point
    read of one prompt's trajectory reads a few row groups. Float vectors are stored as zstd'd byte streams
    (`PACKED`); nulls (``attn_bias`` away from captured positions) cost no bytes. The file is built in memory,
    hashed and written by `place`. ``sync_folder`` false leaves the rename's fsync of the folder to the caller (one
    for all the segments of a batch).
    """
    table = _sorted(table, name)
    step = group_rows(table.nbytes, table.num_rows)
    stats = statistics_for(name, table.column_names)
    parts = write_parquet(table, step, stats, pack=name in PACKED)  # `geomap.store.parquet_fast`
    if parts is None:  # a column that writer does not handle (bfloat16 vectors as binary): pyarrow's writer
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, row_group_size=step, compression="none", use_dictionary=False,
                       write_statistics=stats, store_schema=False)
        parts = [buffer.getvalue()]
    return place(folder, name, parts, table.num_rows, sync_folder)


def place(folder: Path, name: str, parts: Iterable, rows: int, sync_folder: bool = True) -> Segment:
    """Write the buffers ``parts`` as a new segment of table ``name``: under a temporary name, fsynced, renamed.

    ``parts`` is a list, or a generator that makes the buffers as they are written; nothing is left behind if it
    fails.
    """
    folder.mkdir(parents=True, exist_ok=True)
    file = f"{name}-{uuid.uuid4().hex[:16]}.parquet"
    tmp = folder / f".{file}.tmp"
    sizes: list[int] = []

    def counted() -> Iterator:
        for part in parts:
            sizes.append(memoryview(part).nbytes)
            yield part

    try:
        digest = write_temp(tmp, counted())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    kill_point("segment.temp_written")
    os.replace(tmp, folder / file)
    if sync_folder:
        fsync_path(folder)
    return Segment(file, rows, sum(sizes), digest)


@dataclass(frozen=True)
class Extent:
    """What a segment's catalog row says of its rows: the prompt-id range, and the largest state id (states)."""

    min_prompt: int
    max_prompt: int
    max_id: int | None = None

    @classmethod
    def of(cls, table: pa.Table, name: str) -> Extent:
        """The extent of a table's rows (table ``name`` of `SEGMENT_TABLES`)."""
        prompts = table.column("prompt_id")
        max_id = pc.max(table.column("id")).as_py() if name == "states" else None
        return cls(pc.min(prompts).as_py(), pc.max(prompts).as_py(), max_id)

    def join(self, other: Extent) -> Extent:
        """The extent of both segments' rows together."""
        ids = [i for i in (self.max_id, other.max_id) if i is not None]
        return Extent(min(self.min_prompt, other.min_prompt), max(self.max_prompt, other.max_prompt),
                      max(ids) if ids else None)


def catalog(con: duckdb.DuckDBPyConnection, name: str, segment: Segment, extent: Extent) -> None:
    """Insert a segment's catalog row (inside the caller's transaction)."""
    con.execute("INSERT INTO internal.segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                [segment.file, name, segment.rows, segment.bytes, segment.sha256, extent.min_prompt,
                 extent.max_prompt, extent.max_id, SEGMENT_FORMAT])


def store_segments(con: duckdb.DuckDBPyConnection, tables: dict[str, pa.Table]) -> dict[str, int]:
    """Write the segment tables of one batch as segments and catalog them, in the caller's open transaction.

    Returns:
        Rows written per table.
    """
    folder = segment_dir(store_path(con))
    todo = {name: table for name, table in tables.items() if table.num_rows}
    pool = ThreadPoolExecutor(max_workers=max(len(todo), 1), thread_name_prefix="geomap-segment")
    try:  # the tables of a batch are encoded (numpy and zstd, without the GIL) and written side by side
        written = {name: pool.submit(write_segment, table, name, folder, False) for name, table in todo.items()}
        segments = {name: future.result() for name, future in written.items()}
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # no write still running once the batch rolls back
        raise
    pool.shutdown(wait=False)  # every result is in: the idle threads exit on their own (a wait for each, under load)
    counts = {}
    for name, segment in segments.items():
        catalog(con, name, segment, Extent.of(todo[name], name))
        counts[name] = todo[name].num_rows
    if "states" in todo:
        scalars.insert(con, todo["states"])  # what the trajectory views read, in the same commit
    if counts:
        fsync_path(folder)  # the renames are durable before the catalog rows can commit
    kill_point("segment.cataloged")
    refresh_views(con, [n for n in tables if tables[n].num_rows])
    return counts


def next_state_id(con: duckdb.DuckDBPyConnection) -> int:
    """The id the next stored state gets: one past the largest in the ``states_rows`` table and the catalog."""
    return int(con.execute("SELECT greatest((SELECT coalesce(max(id), 0) FROM internal.states_rows), "
                           "(SELECT coalesce(max(max_id), 0) FROM internal.segments WHERE table_name = 'states')) + 1")
               .fetchall()[0][0])


def _columns(con: duckdb.DuckDBPyConnection, table: str, schema: str = "internal") -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ? AND database_name = "
        "current_database() AND schema_name = ? ORDER BY column_index", [table, schema]).fetchall()]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def segment_columns(con: duckdb.DuckDBPyConnection, name: str) -> list[tuple[str, str]]:
    """A segment table's columns and their schema types (those of its ``internal.<name>_rows`` table)."""
    return _columns(con, f"{name}_rows")


def refresh_sql(con: duckdb.DuckDBPyConnection, name: str, files: Sequence[str],
                columns: list[tuple[str, str]] | None = None, folder: Path | None = None) -> str:
    """The SELECT of a segment table over its ``_rows`` table and ``files`` of the segment folder.

    Every column is cast to its schema type: the view's body, or one prompt's read (`geomap.store.scalars.of_prompt`,
    which passes the columns and folder it knows).
    """
    columns = columns if columns is not None else segment_columns(con, name)
    plain = ", ".join(f'"{c}"' for c, _ in columns)
    sql = f"SELECT {plain} FROM internal.{name}_rows"  # noqa: S608 (fixed names)
    if files:
        folder = folder or segment_dir(store_path(con))
        listed = ", ".join(_quote(str(folder / f)) for f in files)
        typed = ", ".join(f'"{c}"::{t} AS "{c}"' for c, t in columns)
        sql += f" UNION ALL SELECT {typed} FROM read_parquet([{listed}])"
    return sql


def refresh_views(con: duckdb.DuckDBPyConnection, names: Sequence[str] = SEGMENT_TABLES, folder: Path | None = None,
                  temporary: bool = False) -> None:
    """(Re)create the views of the segment tables over their ``_rows`` table and every cataloged segment.

    Every column is cast to its schema type. Runs inside the caller's transaction when one is open, so the view
    commits with the catalog. ``folder`` is where the files are (default: beside the store's file); ``temporary``
    views shadow the stored ones for this instance only.
    """
    for name in names:
        if not _columns(con, f"{name}_rows"):
            continue
        files = [r[0] for r in con.execute("SELECT file FROM internal.segments WHERE table_name = ? "
                                           "ORDER BY min_prompt, file", [name]).fetchall()]
        kind = "TEMP VIEW" if temporary else "VIEW"
        con.execute(f"CREATE OR REPLACE {kind} {name} AS {refresh_sql(con, name, files, folder=folder)}")


def views_here(con: duckdb.DuckDBPyConnection, path: Path, persist: bool) -> None:
    """Point the segment views at the segment folder beside ``path``, if they name another one.

    The views name their files by absolute path. A store copied or moved with its folder still has views naming the
    old folder: a writer (``persist``) rewrites them, and a read-only instance gets temporary views of the same names,
    over the same cataloged files in the folder beside the file, that take their place for this instance.
    """
    from geomap.store.db import in_transaction

    folder = segment_dir(path)
    try:
        rows = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'states' AND NOT temporary "
                           "AND schema_name = 'main'").fetchall()
        if not rows or "read_parquet(" not in rows[0][0] or _quote(f"{folder}{os.sep}")[:-1] in rows[0][0]:
            return
        if not persist:
            refresh_views(con, folder=folder, temporary=True)
            return
        with in_transaction(con):
            refresh_views(con)
    except duckdb.Error:  # not a segments store (yet), or a one-query reader whose memory cannot bind the views:
        return  # its queries read the stored views


def remove_orphans(con: duckdb.DuckDBPyConnection, grace_s: float = 0.0) -> list[str]:
    """Delete segment files no committed catalog row names (a killed write), and files retired ``grace_s`` ago.

    A reader's snapshot may still name a retired file (a served store's reader, while compaction commits), so a
    writer that shares its instance with readers keeps retired files for `RETIRE_GRACE_S`, far longer than any
    user query may run; a process that holds the store alone (``geomap store compact``) passes 0.

    Returns:
        The names of the files removed.
    """
    folder = segment_dir(store_path(con))
    if not folder.is_dir():
        return []
    live = {r[0] for r in con.execute("SELECT file FROM internal.segments").fetchall()}
    retired = {r[0] for r in con.execute("SELECT file FROM internal.retired_segments").fetchall()}
    due = {r[0] for r in con.execute("SELECT file FROM internal.retired_segments WHERE "
                                     "epoch(now()::TIMESTAMP) - epoch(retired_at) >= ?", [grace_s]).fetchall()}
    removed = []
    for path in folder.iterdir():
        if path.is_dir() and not path.is_symlink():
            continue  # not a segment (a folder someone made here): left as it is, and no writer fails on it
        orphan = path.name.startswith(".") or (path.name not in live and path.name not in retired)
        if orphan or path.name in due:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if due:
        con.execute("DELETE FROM internal.retired_segments WHERE file IN (SELECT unnest(?))", [sorted(due)])
    return removed


def open_for_writing(con: duckdb.DuckDBPyConnection) -> None:
    """A writer's first step on a segments store: remove orphans, and retired files past their grace."""
    if layout(con) == "segments":
        remove_orphans(con, RETIRE_GRACE_S)

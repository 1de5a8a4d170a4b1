"""Compaction: a table's many small segments merged into few large ones, streamed so memory holds one file at a time.

A writer makes one segment per table per merged batch, so a long ingestion leaves hundreds of small files. Past
`COMPACT_THRESHOLD` of them the merger thread compacts between batches (`compact_if_needed`), beside the capture of
the next batches; ``geomap store compact`` does the same by hand. Small segments are taken in prompt order and
packed into new segments of up to `COMPACT_TARGET_BYTES`.

When the sources of a new segment follow one another (each one's prompts all before the next one's, as a writer's
batches do) their rows are already in the segment's order, and the new file is streamed: a first pass reads each
source once for its size, nulls and extent, and a second writes it one row group at a time
(`geomap.store.parquet_fast.stream_parquet`). Memory then holds one source file and one row group, not every source
and the encoded file at once (a 128 MB segment's sources are about 230 MB of floats once decoded, and the merger
thread held them, a combined copy and the encoded file beside the capture's own peak). The file is the same, byte
for byte, as the one the in-memory path writes. Sources that overlap, or that the fast writer cannot encode, take
the in-memory path: concatenated, sorted and written by `geomap.store.segments.write_segment`.

Each new segment commits with its catalog row, the old rows' removal and the rewritten view in one transaction; the
old files are retired, and deleted once the grace has passed (at once by default: a process that holds the store
alone), by this or a later writer.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geomap.faults import kill_point
from geomap.store.parquet_fast import WRITER, Unsupported, columns_for, stream_parquet
from geomap.store.segments import (
    PACKED,
    RETIRE_GRACE_S,
    SEGMENT_TABLES,
    Extent,
    Segment,
    catalog,
    group_rows,
    key_order,
    layout,
    place,
    refresh_views,
    remove_orphans,
    segment_columns,
    segment_dir,
    statistics_for,
    store_path,
    write_segment,
)

COMPACT_THRESHOLD = 64  # small segments of one table that trigger automatic compaction after a merge
COMPACT_TARGET_BYTES = 128 << 20  # a compacted segment holds at most about this many bytes (on disk)


def compact_if_needed(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Compact when some table has more than `COMPACT_THRESHOLD` small segments (between a writer's batches).

    The replaced files are kept for `RETIRE_GRACE_S`: readers of a served store may still be reading them.
    """
    if layout(con) != "segments" or not needs_compaction(con):
        return {}
    return compact(con, grace_s=RETIRE_GRACE_S)


def needs_compaction(con: duckdb.DuckDBPyConnection, threshold: int = COMPACT_THRESHOLD) -> bool:
    """Whether some table has more than ``threshold`` small segments."""
    most = con.execute("SELECT max(n) FROM (SELECT count(*) AS n FROM internal.segments WHERE bytes < ? "
                       "GROUP BY table_name)", [COMPACT_TARGET_BYTES // 2]).fetchall()[0][0]
    return (most or 0) > threshold


def compact(con: duckdb.DuckDBPyConnection, names: Sequence[str] = SEGMENT_TABLES,
            target_bytes: int = COMPACT_TARGET_BYTES, grace_s: float = 0.0, stream: bool = True) -> dict[str, int]:
    """Merge each table's small segments into few large ones; idempotent and kill-safe.

    Args:
        con: A writer's connection to a segments store.
        names: The tables to compact.
        target_bytes: The most bytes a new segment gets (segments under half of it count as small).
        grace_s: How long the replaced files stay on disk for readers that may still read them.
        stream: Write a new segment row group by row group where its sources allow it (see the module); False
            always concatenates in memory (the reference the streamed files are checked against).

    Returns:
        Segments replaced per table.
    """
    def small(name: str, rows: list[tuple], types: dict, folder: Path) -> list[list[tuple]]:
        below = [row for row in rows if row[1] < max(target_bytes // 2, 1)]
        return [group for group in _groups(below, target_bytes) if len(group) > 1]

    return _swap(con, names, small, grace_s, stream)


def rewrite_foreign(con: duckdb.DuckDBPyConnection, names: Sequence[str] = SEGMENT_TABLES,
                    grace_s: float = 0.0) -> dict[str, int]:
    """Write again, one by one, the segments that another writer made and geomap's own writer can now encode.

    Earlier compactions fell back to pyarrow's writer for ``contributions`` (its vectors read back as variable
    lists, which that writer's fallback stored uncompressed). Those files are rewritten by `parquet_fast`, with the
    same rows; a file only pyarrow can write (bfloat16 vectors) is left as it is, so a second call does nothing.
    Each rewrite commits as a compaction does (kill-safe, at the same boundary; the old file is retired).

    Returns:
        Segments rewritten per table.
    """
    def others(name: str, rows: list[tuple], types: dict, folder: Path) -> list[list[tuple]]:
        return [[row] for row in rows if foreign(folder / row[0], types, pack=name in PACKED)]

    return _swap(con, names, others, grace_s, stream=True)


def _swap(con: duckdb.DuckDBPyConnection, names: Sequence[str], pick: Callable, grace_s: float,
          stream: bool) -> dict[str, int]:
    """For each table, replace every group of segments ``pick`` chooses by one new segment; then remove orphans.

    ``pick(name, rows, types, folder)`` gets the table's catalog rows (file, bytes, min and max prompt) in prompt
    order. Returns the segments replaced per table.
    """
    folder = segment_dir(store_path(con))
    replaced: dict[str, int] = {}
    for name in names:
        rows = con.execute("SELECT file, bytes, min_prompt, max_prompt FROM internal.segments WHERE table_name = ? "
                           "ORDER BY min_prompt, file", [name]).fetchall()
        types = arrow_types(segment_columns(con, name))
        for group in pick(name, rows, types, folder):
            _replace(con, folder, name, group, types, stream)
            replaced[name] = replaced.get(name, 0) + len(group)
    remove_orphans(con, grace_s)
    return replaced


def foreign(path: Path, types: dict[str, pa.DataType], pack: bool) -> bool:
    """Whether a segment file was written by another writer than geomap's, which could encode it now.

    A column whose values only pyarrow writes (non-null binary: bfloat16 vectors) keeps the file as it is; so does a
    binary column whose footer does not say it is null throughout.
    """
    with unreadable(path):
        meta = pq.read_metadata(path)
        if meta.created_by == WRITER or not meta.num_rows:
            return False
        schema = pq.read_schema(path)
    schema = pa.schema([pa.field(f.name, types.get(f.name, f.type)) for f in schema])
    all_null = []  # one leaf column per field: segment tables hold no structs
    for i in range(meta.num_columns):
        stats = [meta.row_group(g).column(i).statistics for g in range(meta.num_row_groups)]
        known = all(s is not None and s.has_null_count for s in stats)
        all_null.append(known and sum(s.null_count for s in stats) == meta.num_rows)
    try:
        columns_for(schema, all_null, pack)
    except Unsupported:
        return False
    return True


def _replace(con: duckdb.DuckDBPyConnection, folder: Path, name: str, group: list[tuple],
             types: dict[str, pa.DataType], stream: bool) -> None:
    """Write ``group``'s rows as one new segment and swap it in, in one transaction, the old files retired."""
    from geomap.store.db import in_transaction

    files = [row[0] for row in group]
    with in_transaction(con):
        segment, extent = _merge(folder, name, group, types, stream)
        con.execute("DELETE FROM internal.segments WHERE file IN (SELECT unnest(?))", [files])
        catalog(con, name, segment, extent)
        con.execute("INSERT INTO internal.retired_segments SELECT unnest(?), now()", [files])
        refresh_views(con, [name])
        kill_point("segment.compacted")


def _groups(small: list[tuple], target_bytes: int) -> list[list[tuple]]:
    """Catalog rows (file, bytes, min and max prompt) in prompt order, packed into groups of up to ``target_bytes``."""
    groups, current, size = [], [], 0
    for row in small:
        if current and size + row[1] > target_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(row)
        size += row[1]
    if current:
        groups.append(current)
    return groups


def arrow_types(columns: Sequence[tuple[str, str]]) -> dict[str, pa.DataType]:
    """The Arrow types a segment's columns are written with, where reading its file back does not give them.

    A ``FLOAT[d]`` column is written as a Parquet list and reads back as a variable-size list; it is cast back to
    the fixed-size list the writer was given, so a compacted file is encoded as a batch's file is (and the fast
    writer takes its null rows: ``attn_bias`` away from the captured positions).
    """
    out = {}
    for column, kind in columns:
        match = re.fullmatch(r"(FLOAT|DOUBLE)\[(\d+)\]", kind)
        if match:
            out[column] = pa.list_(pa.float32() if match[1] == "FLOAT" else pa.float64(), int(match[2]))
    return out


def _read(path: Path, types: dict[str, pa.DataType]) -> pa.Table:
    """A segment file's rows, its vector columns in the types they were written with (`arrow_types`)."""
    with unreadable(path):
        table = pq.read_table(path)
    for i, field in enumerate(table.schema):
        kind = types.get(field.name)
        if kind is not None and field.type != kind:
            table = table.set_column(i, field.name, table.column(i).cast(kind))
    return table


@contextlib.contextmanager
def unreadable(path: Path) -> Iterator[None]:
    """Turn a segment file that is missing or cannot be read as Parquet into one `StoreError` naming it.

    A disk's own refusal (an ``OSError`` with an errno) passes as it is, for the CLI's storage message.
    """
    from geomap.store.db import StoreError

    try:
        yield
    except FileNotFoundError:
        raise StoreError(f"The store's segment file {path} is missing: a store is its .duckdb file and the "
                         f"{path.parent.name} folder beside it (its vectors); copy or move them together. "
                         "Nothing was compacted from this file.") from None
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        detail = " ".join(str(exc).split())
        raise StoreError(f"The store's segment file {path} cannot be read ({detail}): it is damaged, and the rows "
                         "it holds with it; nothing was compacted from it. Restore the store (its .duckdb file and "
                         "segment folder) from a copy.") from None


def _merge(folder: Path, name: str, group: list[tuple], types: dict[str, pa.DataType],
           stream: bool) -> tuple[Segment, Extent]:
    """Write the rows of the segments ``group`` (catalog rows) as one new segment; its `Segment` and `Extent`."""
    paths = [folder / row[0] for row in group]
    follow = all(a[3] < b[2] for a, b in zip(group, group[1:]))  # each source's prompts before the next one's
    if stream and follow:
        try:
            return _streamed(paths, name, folder, types)
        except Unsupported:
            pass  # a column the fast writer cannot encode (bfloat16 vectors as binary): the in-memory path
    table = pa.concat_tables([_read(p, types) for p in paths])
    return write_segment(table, name, folder, sync_folder=True), Extent.of(table, name)


def _streamed(paths: list[Path], name: str, folder: Path, types: dict[str, pa.DataType]) -> tuple[Segment, Extent]:
    """`_merge` one row group at a time, for sources that follow one another (`Unsupported` if it cannot)."""
    schema, rows, nbytes, nulls, extent = None, 0, 0, None, None
    for path in paths:  # first pass: what the in-memory path would learn from the whole table
        table = _read(path, types)
        if schema is None:
            schema, nulls = table.schema, np.zeros(table.num_columns, np.int64)
        elif not table.schema.equals(schema):
            raise Unsupported(f"{path.name}: another schema")
        if key_order(table, name) is not None:  # each source is in segment order, as `write_segment` leaves it
            raise Unsupported(f"{path.name}: rows out of order")
        rows, nbytes = rows + table.num_rows, nbytes + table.nbytes
        nulls += [c.null_count for c in table.columns]
        here = Extent.of(table, name)
        extent = here if extent is None else extent.join(here)
        del table
    columns = columns_for(schema, [n == rows for n in nulls], pack=name in PACKED)
    step = group_rows(nbytes, rows)
    parts = stream_parquet(columns, _row_groups(paths, step, types), statistics_for(name, schema.names))
    return place(folder, name, parts, rows, sync_folder=True), extent


def _row_groups(paths: list[Path], step: int, types: dict[str, pa.DataType]) -> Iterator[pa.Table]:
    """The rows of ``paths`` in order, as tables of ``step`` rows (the last one shorter), one source read at a time."""
    pending: list[pa.Table] = []
    have = 0
    for path in paths:
        pending.append(_read(path, types))
        have += pending[-1].num_rows
        while have >= step:
            rows = pa.concat_tables(pending)
            yield rows.slice(0, step)
            pending = [rows.slice(step)]
            have -= step
    if have:
        yield pa.concat_tables(pending)

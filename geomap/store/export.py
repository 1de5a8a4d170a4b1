"""Export: a table or a read-only query of the store, streamed to a file with no row cap.

The query goes through the same guard, lockdown and time limit as `geomap.store.sql.run_sql`, but its rows are never
held at once: DuckDB hands them over as Arrow record batches and each batch goes straight to a pyarrow writer, so
memory stays bounded (a batch at a time) however many rows there are. Vectors keep their stored dtype (``FLOAT[d]``
is float32 in every format).

Formats:
- ``parquet`` and ``arrow`` (the Arrow IPC file format): every column with its type, ``FLOAT[d]`` as a fixed-size
  list of float32;
- ``csv``: one line a row; a list, struct or map column is written as DuckDB's text of it (``[0.1, -2.5]``), whose
  float32 values are the shortest digits that read back to the same float32;
- ``npy``: exactly one column of numbers; a vector column becomes one ``(rows, d)`` array of its dtype.

The file is written beside its destination and renamed into place at the end, so a refused or interrupted export
leaves no partial file.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from geomap.errors import GeomapError
from geomap.store.handle import StoreLike
from geomap.store.owned import refuse_output
from geomap.store.sql import (
    SqlMemory,
    SqlTimeout,
    batches_of,
    error_for,
    guard,
    no_memory,
    open_reader,
)
from geomap.store.sql_budget import DEFAULT_MEMORY_MB, GATE, TRIGGER, Watchdog, check_limits

FORMATS = ("parquet", "csv", "arrow", "npy")
SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".arrow": "arrow", ".feather": "arrow",
            ".ipc": "arrow", ".npy": "npy"}
BATCH_ROWS = 2048  # rows per record batch: 5 MB of FLOAT[640] vectors
EXPORT_TIME_LIMIT = 600.0
DUCKDB_SHARE = TRIGGER / 8  # DuckDB's own memory: rows only pass through it, so most of the budget is margin
EXPORT_THREADS = 1  # a DuckDB thread holds its own scan buffers and arenas; the writer, not the scan, sets the pace
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ExportError(GeomapError):
    """The export cannot be written as asked (format, destination, or a column the format cannot hold)."""


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote: the file, its format, rows and bytes, and the seconds taken."""

    path: Path
    format: str
    rows: int
    bytes: int
    seconds: float


def format_for(out: str | Path, fmt: str | None = None) -> str:
    """The export format: ``fmt`` when given, else the one the file name's suffix names.

    Raises:
        ExportError: An unknown format, or no format given and an unknown suffix.
    """
    if fmt is None:
        fmt = SUFFIXES.get(Path(out).suffix.lower())
        if fmt is None:
            raise ExportError(f"Cannot tell the format from {Path(out).name!r}: give --format "
                              f"({', '.join(FORMATS)}) or a file ending in {', '.join(SUFFIXES)}.")
    if fmt not in FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
    return fmt


def query_for(query_or_table: str) -> str:
    """A bare name (``states``, ``journey``) as ``SELECT * FROM name``; anything else is taken as SQL."""
    text = query_or_table.strip()
    return f'SELECT * FROM "{text}"' if _NAME.fullmatch(text) else text


def export(store: StoreLike, query_or_table: str, out: str | Path, fmt: str | None = None,
           params: Any = None, time_limit: float = EXPORT_TIME_LIMIT, memory_mb: float = DEFAULT_MEMORY_MB,
           on_rows: Callable[[int], None] | None = None) -> ExportSummary:
    """Stream a table or a read-only query of the store into a file, with no row cap.

    Args:
        store: The store (a path is opened privately for the export, read-only and locked down).
        query_or_table: A table or view name, or one read-only SQL statement (checked as `run_sql` checks it).
        out: The file to write (replaced when the export succeeds).
        fmt: One of `FORMATS`; default from ``out``'s suffix.
        params: Values for the statement's placeholders.
        time_limit: Seconds before the export is interrupted.
        memory_mb: The memory budget, as for `run_sql`: DuckDB's limit and the most the process may grow.
        on_rows: Called with the number of rows of each batch written (a progress bar).

    Returns:
        What was written.

    Raises:
        ExportError: The format is unknown, or the rows do not fit it (npy: one column of numbers).
        SqlRefused: The statement is refused, ran past the time limit (`SqlTimeout`) or the budget (`SqlMemory`).
        SqlError: DuckDB rejected the statement.
    """
    fmt = format_for(out, fmt)
    check_limits(time_limit, 1, memory_mb)
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give a file name (e.g. {out / ('export.' + fmt)}).")
    refuse_output(store if isinstance(store, (str, Path)) else store.path, out)
    sql, budget, start = query_for(query_or_table), int(memory_mb * 2**20), time.perf_counter()
    if not GATE.enter(start + time_limit):
        raise SqlTimeout(f"Refused: all {GATE.size} reader slots stayed busy for the whole time limit of "
                         f"{time_limit:g} s; try again.")
    try:
        con, probe, instance = open_reader(store, memory_mb, DUCKDB_SHARE, EXPORT_THREADS)
        try:
            watch = Watchdog(con, time_limit, budget, start, probe, instance)
            return _export(con, watch, sql, params, out, fmt, memory_mb, budget, on_rows)
        finally:
            con.close()
    finally:
        GATE.leave()


def _export(con: duckdb.DuckDBPyConnection, watch: Watchdog, sql: str, params: Any, out: Path, fmt: str,
            memory_mb: float, budget: int, on_rows) -> ExportSummary:
    guard(con, sql, budget, memory_mb)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with watch:
            rel = con.sql(sql, params=params)
            if rel is None or not rel.columns:
                raise ExportError("The statement returns no rows to export.")
            if fmt == "csv":
                rel = _flat_text(con, rel, sql, params)
            rows = _write(rel.to_arrow_reader(BATCH_ROWS), tmp, fmt, watch, on_rows)
    except (duckdb.Error, SqlMemory, ExportError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, duckdb.OutOfMemoryException) and not watch.over_memory.is_set():
            share = max(int(memory_mb * DUCKDB_SHARE), 1)
            raise no_memory(memory_mb, f": DuckDB's working share of it ({share} MB; an export streams its rows, so "
                                       f"DuckDB keeps little) ran out after {watch.elapsed():.1f} s") from None
        if watch.over_memory.is_set() or isinstance(exc, (duckdb.OutOfMemoryException, SqlMemory)):
            raise no_memory(memory_mb, f", and was stopped after {watch.elapsed():.1f} s") from None
        if watch.timed_out.is_set():
            raise SqlTimeout(f"Refused: the export ran past its time limit of {watch.time_limit:g} s and was stopped "
                             f"after {watch.elapsed():.1f} s; narrow it (WHERE) or raise --time-limit.") from None
        if isinstance(exc, duckdb.Error):
            raise error_for(exc, sql) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return ExportSummary(out, fmt, rows, out.stat().st_size, watch.elapsed())


def _flat_text(con: duckdb.DuckDBPyConnection, rel: duckdb.DuckDBPyRelation, sql: str, params: Any):
    """The relation with each nested column (list, array, struct, map) cast to DuckDB's text of it, for CSV."""
    nested = [i for i, kind in enumerate(rel.types) if any(m in str(kind) for m in ("[", "STRUCT", "MAP", "UNION"))]
    if not nested:
        return rel
    names = [f'"{c}"' if i not in nested else f'CAST("{c}" AS VARCHAR) AS "{c}"' for i, c in enumerate(rel.columns)]
    if len(set(rel.columns)) != len(rel.columns):
        raise ExportError("CSV export needs distinct column names; name them with AS.")
    return con.sql(f"SELECT {', '.join(names)} FROM ({sql}) AS geomap_export", params=params)


def _write(reader, tmp: Path, fmt: str, watch: Watchdog, on_rows) -> int:
    """Write every batch of ``reader`` to ``tmp`` in ``fmt``; the number of rows."""
    writer = _writer(fmt, tmp, reader.schema)
    rows = 0
    try:
        for batch in batches_of(reader):
            if watch.stopped():
                raise SqlMemory("stopped") if watch.over_memory.is_set() else duckdb.InterruptException("stopped")
            writer.write(batch)
            rows += batch.num_rows
            if on_rows is not None:
                on_rows(batch.num_rows)
    finally:
        writer.close()
    return rows


def _writer(fmt: str, path: Path, schema):
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetWriter(str(path), schema)
    if fmt == "arrow":
        return pa.ipc.new_file(str(path), schema)
    if fmt == "csv":
        import pyarrow.csv as pacsv

        return pacsv.CSVWriter(str(path), schema)
    if len(schema) != 1:
        raise ExportError(f"npy holds one array, and the query returns {len(schema)} columns "
                          f"({', '.join(schema.names)}); select one column, or export parquet or arrow.")
    return NpyWriter(path)


class NpyWriter:
    """Writes batches of one numeric (or vector) column as one ``.npy`` array, its row count filled in at the end."""

    _ROOM = 20  # digits kept for the row count in the header
    _HEADER = 128  # bytes of the whole header, a multiple of 64 as the format asks

    def __init__(self, path: Path):
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by `close`
        self.dtype: np.dtype | None = None
        self.tail: tuple[int, ...] = ()
        self.rows = 0
        self._header()

    def write(self, batch) -> None:
        """Append one record batch's column."""
        from geomap.store.columns import to_numpy

        array = to_numpy(batch.column(0))
        if array.dtype == object:
            raise ExportError(f"npy holds numbers only, and column {batch.schema.names[0]!r} is "
                              f"{batch.schema.types[0]}; export parquet or arrow instead.")
        if self.dtype is None:
            self.dtype, self.tail = array.dtype, array.shape[1:]
        self.handle.write(np.ascontiguousarray(array, dtype=self.dtype).tobytes())
        self.rows += len(array)

    def close(self) -> None:
        """Write the final header (dtype, shape) and close the file."""
        if not self.handle.closed:
            self._header()
            self.handle.close()

    def _header(self) -> None:
        dtype = self.dtype if self.dtype is not None else np.dtype("<f4")
        shape = ", ".join([str(self.rows).rjust(self._ROOM)] + [str(n) for n in self.tail])
        text = f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, " \
               f"'shape': ({shape},), }}"
        prefix = b"\x93NUMPY\x01\x00"
        raw = (text.ljust(self._HEADER - len(prefix) - 3) + "\n").encode("latin1")  # the same length each time
        self.handle.seek(0)
        self.handle.write(prefix + len(raw).to_bytes(2, "little") + raw)
        self.handle.seek(0, 2)

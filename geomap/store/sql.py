"""User SQL against a store: one read-only query in a locked-down connection, with a time limit, a row cap and a budget.

The budget judges that query alone, and many such queries run at once (`geomap.store.sql_budget`).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from geomap.errors import GeomapError
from geomap.store.db import connect, served
from geomap.store.sql_budget import DEFAULT_MEMORY_MB, GATE, TRIGGER, Watchdog, check_limits
from geomap.store.sql_guard import Refused, TooBig, check

FORMATS = ("table", "csv", "json")
_CELL_WIDTH = 80


class SqlError(GeomapError):
    """The SQL could not run: a syntax error, an unknown table or column, a type error."""


class SqlRefused(SqlError):
    """The SQL tried something that store SQL may not do (write, reach files, change settings, ...)."""


class SqlTimeout(SqlRefused):
    """The SQL ran past its time limit and was interrupted."""


class SqlMemory(SqlRefused):
    """The SQL needed more memory than the budget of user SQL."""


def sql_connection_config() -> dict[str, Any]:
    """DuckDB configuration for untrusted read-only SQL: no files, network, extensions or Python variables.

    Returns:
        A config mapping for ``duckdb.connect(path, read_only=True, config=...)``; the configuration is locked, so
        ``SET``/``RESET``/``PRAGMA`` cannot loosen it afterwards.
    """
    return {
        "enable_external_access": False,  # files (read_csv, COPY, ATTACH, glob), network, INSTALL/LOAD of files
        "python_enable_replacements": False,  # no scanning of Python variables by name (SELECT * FROM some_df)
        "autoload_known_extensions": False,
        "autoinstall_known_extensions": False,
        "allow_community_extensions": False,
        "allow_unsigned_extensions": False,
        "lock_configuration": True,  # SET/RESET/PRAGMA cannot loosen any of the above
        "allowed_configs": ["operator_memory_limit"],  # set per cursor by `run_sql`; user SQL cannot SET anything
    }


@dataclass(frozen=True)
class SqlResult:
    """Result of `run_sql`: column names, at most ``max_rows`` rows, whether more were cut, and the run time."""

    columns: list[str]
    rows: list[tuple]
    truncated: bool
    elapsed_s: float

    def to_pandas(self) -> Any:
        """The rows as a pandas DataFrame (duplicate column names are kept)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.rows, columns=self.columns)

    def to_arrow(self) -> Any:
        """The rows as a pyarrow Table; a column Arrow cannot type is given as strings."""
        import pyarrow as pa

        arrays = []
        for i in range(len(self.columns)):
            values = [row[i] for row in self.rows]
            try:
                arrays.append(pa.array(values))
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                arrays.append(pa.array([None if v is None else _text(v) for v in values], pa.string()))
        return pa.Table.from_arrays(arrays, names=list(self.columns))

    def to_records(self) -> list[dict[str, Any]]:
        """The rows as JSON-ready dicts (bytes as UTF-8 text or ``0x`` hex, NaN as None, dates as ISO text)."""
        return [{c: _json_value(v) for c, v in zip(self.columns, row)} for row in self.rows]

    def format(self, fmt: str = "table") -> str:
        """Render the result as ``table`` (aligned plain text), ``csv`` or ``json`` (an array of row objects).

        Raises:
            ValueError: ``fmt`` is not one of `FORMATS`.
        """
        if fmt == "json":
            return json.dumps(self.to_records(), ensure_ascii=False)
        if fmt == "csv":
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(self.columns)
            writer.writerows([_text(v) for v in row] for row in self.rows)
            return out.getvalue()
        if fmt == "table":
            return self._table()
        raise ValueError(f"Unknown format {fmt!r}; use one of {', '.join(FORMATS)}.")

    def _table(self) -> str:
        cells = [[_cell(v) for v in row] for row in self.rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
        right = [all(isinstance(r[i], (int, float, Decimal)) or r[i] is None for r in self.rows) for i in
                 range(len(self.columns))]  # numbers right-aligned

        def line(values: Sequence[str]) -> str:
            return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

        lines = [line(self.columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
        more = ", truncated: more rows matched" if self.truncated else ""
        lines.append(f"({len(self.rows)} row{'' if len(self.rows) == 1 else 's'}{more})")
        return "\n".join(lines)


def _json_value(v: Any) -> Any:
    """A JSON-safe version of a value fetched from DuckDB."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Decimal):
        return int(v) if v.is_finite() and v == v.to_integral_value() else _json_value(float(v))
    if isinstance(v, (bytes, bytearray, memoryview)):
        raw = bytes(v)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "0x" + raw.hex()
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, (dt.timedelta, uuid.UUID)):
        return str(v)
    if isinstance(v, Mapping):
        return {str(_json_value(k)): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_json_value(x) for x in v]
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return _json_value(v.tolist())
    return str(v)


def _text(v: Any) -> str:
    """A value as one line of text for CSV: NULL as empty, nested values as JSON."""
    v = _json_value(v)
    if v is None:
        return ""
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)


def _cell(v: Any) -> str:
    """A value for the plain-text table: one line, at most ``_CELL_WIDTH`` characters."""
    if isinstance(v, float) and math.isfinite(v) and float(np.float32(v)) == v:
        v = float(str(np.float32(v)))  # a FLOAT column's value, shown by its shortest float32 digits
    text = "NULL" if v is None else _text(v).replace("\n", "\\n")
    return text if len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 1] + "…"


def _open(db_path: str | Path, memory_mb: float) -> tuple[duckdb.DuckDBPyConnection, Callable, str]:
    """A read-only connection under `sql_connection_config`, its memory bounded by the budget.

    In a served store this is a cursor of the server's instance (in a READ ONLY transaction: its own snapshot),
    bounded per connection; elsewhere a private instance whose whole ``memory_limit`` (and spill to disk) is the
    budget.

    Returns:
        The connection, what opens a probe of its instance for the watchdog, and the instance's name.
    """
    mb = max(int(memory_mb * TRIGGER), 1)
    if served(db_path):
        con = connect(db_path, read_only=True)
        con.execute(f"SET operator_memory_limit = '{mb}MB'")
        return con, lambda: connect(db_path), f"served:{Path(db_path).resolve()}"
    con = connect(db_path, read_only=True, config={**sql_connection_config(), "memory_limit": f"{mb}MB",
                                                   "max_temp_directory_size": f"{4 * mb}MB"})
    probe = con.cursor()  # made here: the watchdog's thread must not touch a connection while it runs a query
    return con, lambda: probe, f"private:{id(con)}"


class _Rerun(Exception):
    """A query stopped for memory while other queries shared its instance: it is judged again, alone."""


_GUARDED: OrderedDict[tuple[str, int, float], None] = OrderedDict()  # statements the guard passed, by budget
_GUARDED_MAX = 512
_GUARDED_LOCK = threading.Lock()


def _guard(con: duckdb.DuckDBPyConnection, sql: str, budget: int, memory_mb: float) -> None:
    """`geomap.store.sql_guard.check`, remembered for statements it passed (it depends on the text and budget only)."""
    key = (sql, budget, memory_mb)
    with _GUARDED_LOCK:
        if key in _GUARDED:
            _GUARDED.move_to_end(key)
            return
    check(con, sql, budget, memory_mb)
    with _GUARDED_LOCK:
        _GUARDED[key] = None
        while len(_GUARDED) > _GUARDED_MAX:
            _GUARDED.popitem(last=False)


def _error(exc: duckdb.Error) -> SqlError:
    """Map a DuckDB error to a `SqlRefused` naming what was refused, else a `SqlError` with DuckDB's message."""
    msg = str(exc).strip()
    if isinstance(exc, duckdb.PermissionException):
        return SqlRefused(f"Refused: the query reaches outside the store (files, network or extensions): files "
                          f"cannot be read, only the store's tables and views. DuckDB said: {msg}")
    if "read-only mode" in msg or "read-only transaction" in msg:
        return SqlRefused(f"Refused: the query writes to the store, which store SQL can only read. DuckDB said: {msg}")
    if "configuration has been locked" in msg:
        return SqlRefused(f"Refused: the query changes a setting; settings are locked. DuckDB said: {msg}")
    return SqlError(f"SQL error: {msg}")


def _memory(memory_mb: float, detail: str = "") -> SqlMemory:
    return SqlMemory(f"Refused: the query needs more than {memory_mb:g} MB, the memory budget of store SQL{detail}; "
                     "narrow it (WHERE, LIMIT, fewer or smaller columns).")


def _fetch(con: duckdb.DuckDBPyConnection, max_rows: int, cap: int, memory_mb: float, watch: Watchdog) -> list[tuple]:
    """Up to ``max_rows + 1`` rows, in batches that grow while small, stopping once the rows pass the budget."""
    rows: list[tuple] = []
    size, step = 0, 64
    while len(rows) <= max_rows:
        batch = con.fetchmany(min(step, max_rows + 1 - len(rows)))
        if not batch:
            break
        size += sum(_approx_bytes(v) for row in batch for v in row)
        if size > cap or watch.over_memory.is_set():
            raise _memory(memory_mb, f": its first {len(rows) + len(batch)} rows passed it")
        rows.extend(batch)
        step = max(1, min(step * 2, 2048, int(cap / 16 / (size / len(rows) + 1))))  # a batch stays small beside cap
    return rows


def _approx_bytes(v: Any) -> int:
    """A quick estimate of a fetched value's size in memory."""
    if isinstance(v, (str, bytes, bytearray)):
        return 49 + len(v)
    if isinstance(v, (list, tuple)):
        if v and isinstance(v[0], (int, float)):
            return 56 + 32 * len(v)
        return 56 + sum(_approx_bytes(x) for x in v)
    if isinstance(v, dict):
        return 64 + sum(_approx_bytes(k) + _approx_bytes(x) for k, x in v.items())
    return 32


def run_sql(
    db_path: str | Path,
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None = None,
    time_limit: float = 5.0,
    max_rows: int = 10_000,
    memory_mb: float = DEFAULT_MEMORY_MB,
) -> SqlResult:
    """Run one read-only SQL statement against a store, datasette-style, within a time limit and a memory budget.

    Args:
        db_path: The store's DuckDB file.
        sql: One statement: SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, PIVOT, EXPLAIN, or a reading PRAGMA/CALL.
        params: Values for ``?`` (a sequence) or ``$name`` (a mapping) placeholders.
        time_limit: Seconds before the query is interrupted (waiting for a reader slot counts).
        max_rows: Most rows returned; ``truncated`` says whether more matched.
        memory_mb: The memory budget: DuckDB's limit for the query, the most its intermediates may grow by in
            DuckDB's accounting while it runs, and the most its fetched rows may take.

    Returns:
        The columns, up to ``max_rows`` rows, whether rows were cut, and the elapsed seconds.

    Raises:
        SqlRefused: The SQL writes, reaches files/extensions/network, changes settings, or holds several statements.
        SqlTimeout: It ran past ``time_limit`` (the message gives the time it really took).
        SqlMemory: It needed more than ``memory_mb``.
        SqlError: DuckDB rejected it (syntax, unknown table or column, ...), or a limit is not a finite positive
            number (`geomap.store.sql_budget.LimitError`).
        StoreError: There is no store at ``db_path`` (`StoreLockedError` while another process writes to it).
    """
    check_limits(time_limit, max_rows, memory_mb)
    max_rows, budget = int(max_rows), int(memory_mb * 2**20)
    start = time.perf_counter()
    deadline = start + time_limit
    if not GATE.enter(deadline):
        raise SqlTimeout(f"Refused: all {GATE.size} reader slots stayed busy for the whole time limit of "
                         f"{time_limit:g} s; try again.")
    try:
        return _attempt(db_path, sql, params, time_limit, max_rows, memory_mb, budget, start, alone=False)
    except _Rerun:
        pass
    finally:
        GATE.leave()
    if not GATE.alone(deadline):  # judged alone: only what this query builds can refuse it
        raise SqlTimeout(f"Refused: the query ran past its time limit of {time_limit:g} s (waiting to be measured "
                         "alone, after other queries' memory was seen beside its own); try again.")
    try:
        return _attempt(db_path, sql, params, time_limit, max_rows, memory_mb, budget, start, alone=True)
    finally:
        GATE.leave_alone()


def _attempt(db_path, sql: str, params, time_limit: float, max_rows: int, memory_mb: float, budget: int,
             start: float, alone: bool) -> SqlResult:
    con, probe, instance = _open(db_path, memory_mb)
    try:
        return _run(con, sql, params, time_limit, max_rows, memory_mb, budget, start, probe, instance, alone)
    finally:
        con.close()


def _run(con: duckdb.DuckDBPyConnection, sql: str, params, time_limit: float, max_rows: int, memory_mb: float,
         budget: int, start: float, probe: Callable, instance: str, alone: bool) -> SqlResult:
    try:
        _guard(con, sql, int(budget * TRIGGER), memory_mb)
    except Refused as exc:
        if str(exc).startswith("No SQL"):
            raise SqlError(str(exc)) from None
        raise _memory(memory_mb, f": {exc}") if isinstance(exc, TooBig) else SqlRefused(f"Refused {exc}") from None
    except duckdb.Error as exc:
        raise _error(exc) from None
    watch = Watchdog(con, time_limit, budget, start, probe, instance)
    try:
        with watch:
            con.execute(sql, params)
            columns = [d[0] for d in con.description or []]
            rows = _fetch(con, max_rows, int(budget * TRIGGER), memory_mb, watch) if columns else []
    except (duckdb.Error, SqlMemory) as exc:
        elapsed = watch.elapsed()
        memory = watch.over_memory.is_set() or isinstance(exc, duckdb.OutOfMemoryException)
        if memory and watch.shared and not alone and not watch.timed_out.is_set():
            raise _Rerun() from None
        if isinstance(exc, SqlMemory):
            raise
        if memory:
            raise _memory(memory_mb, f", and was stopped after {elapsed:.1f} s") from None
        if watch.timed_out.is_set():
            raise SqlTimeout(f"Refused: the query ran past its time limit of {time_limit:g} s and was stopped "
                             f"after {elapsed:.1f} s; narrow it (WHERE, LIMIT) or raise the limit.") from None
        raise _error(exc) from None
    if watch.over_memory.is_set():
        if watch.shared and not alone:
            raise _Rerun()
        raise _memory(memory_mb, f", and was stopped after {watch.elapsed():.1f} s")
    return SqlResult(columns, rows[:max_rows], len(rows) > max_rows, time.perf_counter() - start)

"""User SQL against a store: one read-only query in a locked-down connection, with a time limit, a row cap and a budget.

The budget judges that query alone, and many such queries run at once (`geomap.store.sql_budget`).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb

from geomap.errors import GeomapError
from geomap.store.db import connect
from geomap.store.handle import Store, StoreLike
from geomap.store.sql_budget import DEFAULT_MEMORY_MB, GATE, TRIGGER, Watchdog, check_limits
from geomap.store.sql_guard import NoStatement, Refused, TooBig, check
from geomap.store.sql_result import SqlResult


class SqlError(GeomapError):
    """The SQL could not run: a syntax error, an unknown table or column, a type error."""


class SqlRefused(SqlError):
    """The SQL tried something that store SQL may not do (write, reach files, change settings, ...)."""

    http_status = 403


class SqlTimeout(SqlRefused):
    """The SQL ran past its time limit and was interrupted."""

    http_status = 408


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


def open_reader(store: StoreLike, memory_mb: float, share: float = TRIGGER,
                threads: int | None = None) -> tuple[duckdb.DuckDBPyConnection, Callable, str]:
    """A read-only connection under `sql_connection_config`, its memory bounded by the budget; the caller closes it.

    In a locked-down store (the one ``geomap serve`` holds) this is a cursor of that instance (in a READ ONLY
    transaction: its own snapshot), bounded per cursor; elsewhere a private instance of the store's file whose whole
    ``memory_limit`` (and spill to disk) is ``share`` of the budget, with ``threads`` threads (default: DuckDB's, one
    a core).

    Returns:
        The connection, what opens a probe of its instance for the watchdog, and the instance's name.
    """
    mb = max(int(memory_mb * share), 1)
    if isinstance(store, Store) and store.locked:
        con = store.cursor()
        con.execute("BEGIN TRANSACTION READ ONLY")
        con.execute(f"SET operator_memory_limit = '{mb}MB'")
        return con, store.cursor, f"served:{store.path.resolve()}"
    path = store.path if isinstance(store, Store) else Path(store)
    config = {**sql_connection_config(), "memory_limit": f"{mb}MB", "max_temp_directory_size": f"{4 * mb}MB"}
    con = connect(path, read_only=True, config=config if threads is None else {**config, "threads": threads},
                  cache_files=False)  # one query's instance: no file blocks kept for later queries
    probe = con.cursor()  # made here: the watchdog's thread must not touch a connection while it runs a query
    return con, lambda: probe, f"private:{id(con)}"


class _Rerun(Exception):
    """A query stopped for memory while other queries shared its instance: it is judged again, alone."""


_GUARDED: OrderedDict[tuple[str, int, float], None] = OrderedDict()  # statements the guard passed, by budget
_GUARDED_MAX = 512
_GUARDED_TEXT = 4096  # longer statements are checked every time: the memory of what is remembered stays small
_GUARDED_LOCK = threading.Lock()


def _guard(con: duckdb.DuckDBPyConnection, sql: str, budget: int, memory_mb: float) -> None:
    """`geomap.store.sql_guard.check`, remembered for statements it passed (it depends on the text and budget only)."""
    key = (sql, budget, memory_mb)
    with _GUARDED_LOCK:
        if key in _GUARDED:
            _GUARDED.move_to_end(key)
            return
    check(con, sql, budget, memory_mb)
    if len(sql) > _GUARDED_TEXT:
        return
    with _GUARDED_LOCK:
        _GUARDED[key] = None
        while len(_GUARDED) > _GUARDED_MAX:
            _GUARDED.popitem(last=False)


def guard(con: duckdb.DuckDBPyConnection, sql: str, budget: int, memory_mb: float) -> None:
    """The parse-time guard on user SQL (`_guard`), its refusals turned into the one-line errors users see."""
    try:
        _guard(con, sql, int(budget * TRIGGER), memory_mb)
    except Refused as exc:
        if isinstance(exc, NoStatement):
            raise SqlError(str(exc)) from None
        raise no_memory(memory_mb, f": {exc}") if isinstance(exc, TooBig) else SqlRefused(f"Refused {exc}") from None
    except duckdb.Error as exc:
        raise error_for(exc, sql) from None


def error_for(exc: duckdb.Error, sql: str | None = None) -> SqlError:
    """Map a DuckDB error to a `SqlRefused` naming what was refused, else a `SqlError` with DuckDB's message.

    ``sql`` (the query) places the error in its line when DuckDB quoted only a window of a long line.
    """
    msg = str(exc).strip()
    elsewhere = re.search(r'Cannot access file "([^"]*\.segments/[^"]*)"', msg)
    if isinstance(exc, duckdb.PermissionException) and elsewhere:  # the store's own views, not the user's SQL
        return SqlError(f"The store's views name the segment file {elsewhere.group(1)}, outside the store's own "
                        "segment folder: the store was copied or moved without its .segments folder (its vectors); "
                        "copy or move the .duckdb file and its folder together.")
    if isinstance(exc, duckdb.PermissionException):
        return SqlRefused(f"Refused: the query reaches outside the store (files, network or extensions): files "
                          f"cannot be read, only the store's tables and views. DuckDB said: {msg}")
    if "read-only mode" in msg or "read-only transaction" in msg:
        return SqlRefused(f"Refused: the query writes to the store, which store SQL can only read. DuckDB said: {msg}")
    if "configuration has been locked" in msg:
        return SqlRefused(f"Refused: the query changes a setting; settings are locked. DuckDB said: {msg}")
    return SqlError(f"SQL error: {_one_line(msg, sql)}")


_CARET = re.compile(r"\n*LINE (\d+): ([^\n]*)\n( *)\^+[^\n]*")
_CUT = "..."  # DuckDB quotes a window of a long line, cut at either end with this


def _one_line(message: str, sql: str | None = None) -> str:
    """DuckDB's message on one line: its quoted line and caret become ``(line N, column C)``, its hints follow.

    DuckDB quotes a long line as a window (``...`` at a cut end), its caret under the window: the window is found
    in ``sql``'s line to give the column in the line; without ``sql``, or if it is not found, only the line is named.
    """
    where = ""
    match = _CARET.search(message)
    if match:
        number, shown = int(match.group(1)), match.group(2)
        column = len(match.group(3)) - len(f"LINE {number}: ") + 1
        where = f" (line {number}, column {max(column, 1)})"
        if shown.startswith(_CUT):
            start = _window(sql, number, shown)
            where = f" (line {number})" if start is None else f" (line {number}, column {start + column - len(_CUT)})"
        message = message[:match.start()] + message[match.end():]
    first, *rest = [line.strip() for line in message.strip().splitlines() if line.strip()] or [""]
    return " ".join([first + where, *rest])


def _window(sql: str | None, number: int, shown: str) -> int | None:
    """Where DuckDB's quoted window ``shown`` (cut at its start) begins in line ``number`` of ``sql`` (0-based)."""
    lines = (sql or "").splitlines()
    text = shown[len(_CUT):].removesuffix(_CUT)
    if not text or not 0 < number <= len(lines):
        return None
    found = lines[number - 1].find(text)
    return None if found < 0 else found


def no_memory(memory_mb: float, detail: str = "") -> SqlMemory:
    """The `SqlMemory` refusal of a query that needs more than the budget (``detail`` says how it was seen)."""
    return SqlMemory(f"Refused: the query needs more than {memory_mb:g} MB, the memory budget of store SQL{detail}; "
                     "narrow it (WHERE, LIMIT, fewer or smaller columns).")


FETCH_ROWS = 1024  # rows per Arrow batch read from DuckDB


def batches_of(reader) -> Any:
    """The record batches of a DuckDB Arrow reader, DuckDB's errors raised as `duckdb.Error` again.

    Through the reader, DuckDB's errors (an interrupt, out of memory, a conversion error) arrive as pyarrow's
    exceptions; they are turned back into DuckDB's own classes so callers map them as they map any DuckDB error.
    """
    import pyarrow as pa

    iterator = iter(reader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            message = str(exc)
            if "Out of Memory" in message:
                raise duckdb.OutOfMemoryException(message) from None
            if "INTERRUPT" in message:
                raise duckdb.InterruptException(message) from None
            raise duckdb.Error(message) from None
        yield batch


def _fetch(rel: duckdb.DuckDBPyRelation, max_rows: int, cap: int, memory_mb: float, watch: Watchdog):
    """Up to ``max_rows + 1`` rows as one Arrow table, stopping once the rows or the process pass the budget."""
    import pyarrow as pa

    reader = rel.to_arrow_reader(min(FETCH_ROWS, max_rows + 1))
    batches, count, size = [], 0, 0
    for batch in batches_of(reader):
        batches.append(batch)
        count += batch.num_rows
        size += batch.nbytes
        if size > cap or watch.over_memory.is_set():
            raise no_memory(memory_mb, f": its first {count} rows passed it")
        if count > max_rows:
            break
    return pa.Table.from_batches(batches, schema=reader.schema)


def run_sql(
    store: StoreLike,
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None = None,
    time_limit: float = 5.0,
    max_rows: int = 10_000,
    memory_mb: float = DEFAULT_MEMORY_MB,
    since: float | None = None,
) -> SqlResult:
    """Run one read-only SQL statement against a store, datasette-style, within a time limit and a memory budget.

    Args:
        store: The store (a locked-down one, as `geomap serve` holds, lends a cursor; otherwise its file is opened
            privately under `sql_connection_config`).
        sql: One statement: SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, PIVOT, EXPLAIN, or a reading PRAGMA/CALL.
        params: Values for ``?`` (a sequence) or ``$name`` (a mapping) placeholders.
        time_limit: Seconds before the query is interrupted (waiting for a reader slot counts).
        max_rows: Most rows returned; ``truncated`` says whether more matched.
        memory_mb: The memory budget: DuckDB's limit for the query, the most its intermediates may grow by in
            DuckDB's accounting while it runs, and the most its fetched rows may take.
        since: When the query's time began (a ``time.perf_counter()`` value; default now): a server passes the
            request's arrival, so a wait in line before the call counts against ``time_limit`` too.

    Returns:
        The columns, up to ``max_rows`` rows, whether rows were cut, and the elapsed seconds.

    Raises:
        SqlRefused: The SQL writes, reaches files/extensions/network, changes settings, or holds several statements.
        SqlTimeout: It ran past ``time_limit`` (the message gives the time it really took).
        SqlMemory: It needed more than ``memory_mb``.
        SqlError: DuckDB rejected it (syntax, unknown table or column, ...), or a limit is not a finite positive
            number (`geomap.store.sql_budget.LimitError`).
        StoreError: There is no store at that path (`StoreLockedError` while another process writes to it).
    """
    check_limits(time_limit, max_rows, memory_mb)
    max_rows, budget = int(max_rows), int(memory_mb * 2**20)
    start = time.perf_counter() if since is None else min(since, time.perf_counter())
    deadline = start + time_limit
    if deadline <= time.perf_counter() or not GATE.enter(deadline):
        raise SqlTimeout(f"Refused: all {GATE.size} reader slots stayed busy for the whole time limit of "
                         f"{time_limit:g} s; try again.")
    try:
        return _attempt(store, sql, params, time_limit, max_rows, memory_mb, budget, start, alone=False)
    except _Rerun:
        pass
    finally:
        GATE.leave()
    if not GATE.alone(deadline):  # judged alone: only what this query builds can refuse it
        raise SqlTimeout(f"Refused: the query ran past its time limit of {time_limit:g} s (waiting to be measured "
                         "alone, after other queries' memory was seen beside its own); try again.")
    try:
        return _attempt(store, sql, params, time_limit, max_rows, memory_mb, budget, start, alone=True)
    finally:
        GATE.leave_alone()


def _attempt(store: StoreLike, sql: str, params, time_limit: float, max_rows: int, memory_mb: float, budget: int,
             start: float, alone: bool) -> SqlResult:
    con, probe, instance = open_reader(store, memory_mb)
    try:
        return _run(con, sql, params, time_limit, max_rows, memory_mb, budget, start, probe, instance, alone)
    finally:
        con.close()


def _run(con: duckdb.DuckDBPyConnection, sql: str, params, time_limit: float, max_rows: int, memory_mb: float,
         budget: int, start: float, probe: Callable, instance: str, alone: bool) -> SqlResult:
    guard(con, sql, budget, memory_mb)
    watch = Watchdog(con, time_limit, budget, start, probe, instance)
    try:
        with watch:
            rel = con.sql(sql, params=params)
            columns = list(rel.columns) if rel is not None else []
            table = _fetch(rel, max_rows, int(budget * TRIGGER), memory_mb, watch) if columns else None
    except (duckdb.Error, SqlMemory) as exc:
        elapsed = watch.elapsed()
        memory = watch.over_memory.is_set() or isinstance(exc, duckdb.OutOfMemoryException)
        if memory and watch.shared and not alone and not watch.timed_out.is_set():
            raise _Rerun() from None
        if isinstance(exc, SqlMemory):
            raise
        if memory:
            raise no_memory(memory_mb, f", and was stopped after {elapsed:.1f} s") from None
        if watch.timed_out.is_set():
            raise SqlTimeout(f"Refused: the query ran past its time limit of {time_limit:g} s and was stopped "
                             f"after {elapsed:.1f} s; narrow it (WHERE, LIMIT) or raise the limit.") from None
        raise error_for(exc, sql) from None
    if watch.over_memory.is_set():
        if watch.shared and not alone:
            raise _Rerun()
        raise no_memory(memory_mb, f", and was stopped after {watch.elapsed():.1f} s")
    count = 0 if table is None else table.num_rows
    if table is not None:
        table = table.slice(0, max_rows)
    return SqlResult(columns, None, count > max_rows, time.perf_counter() - start, table=table)

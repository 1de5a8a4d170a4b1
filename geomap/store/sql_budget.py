"""The limits of user SQL: checked numbers, one query at a time, and a watchdog for time and memory.

DuckDB bounds what goes through its buffer manager (``memory_limit`` for a private instance, the per-connection
``operator_memory_limit`` for a cursor of the served one), but some values are built outside it (a list from
``range(n)``, a string from ``repeat``), and an interrupt is only noticed between steps. So user SQL also runs under a
`Watchdog`: a thread that samples the process's resident memory every few milliseconds and interrupts the query when
it has grown by `TRIGGER` of the budget (DuckDB notices an interrupt between steps, and a growing list or string
doubles its buffer, so the query overshoots the trigger before it stops; the rest of the budget is that margin), or
when the time limit passes. One query runs at a time (`SLOT`), so the growth
it sees is that query's own. `geomap.store.sql_guard` refuses beforehand what a constant sets beyond the budget.
"""

from __future__ import annotations

import math
import os
import threading
import time
from numbers import Real

import duckdb

from geomap.errors import GeomapError

DEFAULT_MEMORY_MB = 1024  # user SQL's memory budget (server and CLI), MB
MAX_MEMORY_MB = 1 << 20
SAMPLE_S = 0.005  # how often the watchdog looks
TRIGGER = 0.25  # the share of the budget at which the watchdog interrupts
SLOT = threading.Lock()  # one user query at a time in a process
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class LimitError(GeomapError):
    """A limit given for user SQL is not a usable number."""


def check_limits(time_limit: object, max_rows: object, memory_mb: object = DEFAULT_MEMORY_MB) -> None:
    """Refuse limits that are not finite positive numbers (NaN, infinity, 0, negatives, booleans, fractions of rows).

    Raises:
        LimitError: One sentence naming the bad limit.
    """
    def finite_positive(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)) or value <= 0:
            raise LimitError(f"{name} must be a finite number above 0, not {value!r}.")

    finite_positive("the time limit", time_limit)
    finite_positive("the row cap", max_rows)
    finite_positive("the memory budget", memory_mb)
    if float(max_rows) != int(max_rows):
        raise LimitError(f"the row cap must be a whole number, not {max_rows!r}.")
    if memory_mb > MAX_MEMORY_MB:
        raise LimitError(f"the memory budget must be at most {MAX_MEMORY_MB} MB, not {memory_mb!r}.")


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux ``/proc``), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class Watchdog:
    """Interrupts one connection's query past a time limit or a memory budget (growth of resident memory).

    Args:
        con: The connection running the query.
        time_limit: Seconds from ``start``.
        budget: Bytes the process may grow by while the query runs.
        start: ``time.perf_counter()`` when the request began (waiting for the slot counts).
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, time_limit: float, budget: int, start: float):
        self.con, self.time_limit, self.budget, self.start = con, time_limit, budget, start
        self.timed_out = threading.Event()
        self.over_memory = threading.Event()
        self.peak_growth = 0
        self._done = threading.Event()
        self._base = rss_bytes()
        self._thread = threading.Thread(target=self._watch, name="geomap-sql-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def elapsed(self) -> float:
        """Seconds since the request began."""
        return time.perf_counter() - self.start

    def stopped(self) -> bool:
        """Whether the watchdog interrupted the query."""
        return self.timed_out.is_set() or self.over_memory.is_set()

    def _watch(self) -> None:
        while not self._done.wait(SAMPLE_S):
            now = rss_bytes()
            if now is not None and self._base is not None:
                self.peak_growth = max(self.peak_growth, now - self._base)
                if now - self._base > self.budget * TRIGGER:
                    self.over_memory.set()
            if self.elapsed() > self.time_limit:
                self.timed_out.set()
            if self.stopped():
                self.con.interrupt()  # repeated until the query ends: an interrupt lands between DuckDB's steps

"""The limits of user SQL: checked numbers, a bounded pool of readers, and a watchdog that judges each query alone.

A query's memory is bounded by what belongs to that query, never by the process's resident set (which holds an
ingestion job's batches, a report's render, other readers):

- `geomap.store.sql_guard` refuses beforehand a list or string whose size a constant sets beyond the budget (DuckDB
  builds those in one step, outside its accounting, and cannot be interrupted while it does);
- DuckDB bounds the query's sorts and hash tables per cursor (``operator_memory_limit``, spilling to disk);
- the rows it fetches are counted, batch by batch, against the budget (`geomap.store.sql`);
- the `Watchdog` reads DuckDB's own accounting of query intermediates (`QUERY_TAGS` of ``duckdb_memory()``: the
  aggregate states of ``list``/``string_agg``, hash tables, sorts, windows; not the cached table blocks an
  ingestion fills) and interrupts the query when they have grown by `TRIGGER` of the budget since it began, or when
  the time limit passes. DuckDB notices an interrupt between steps, so a query overshoots the trigger before it
  stops; the rest of the budget is that margin.

That accounting is the instance's, so while several readers run, one query's growth is seen by all of them. A query
stopped for memory while others ran is therefore judged again alone (`ReaderGate.alone`): it reruns with the pool to
itself, and only what it then builds can refuse it. An honest query beside a memory bomb loses time, never its
answer.

Readers run in parallel on a pool of `READERS` slots sized to the machine (datasette's ``num_sql_threads``); a query
waiting for a slot counts the wait against its time limit.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from numbers import Real

import duckdb

from geomap.errors import GeomapError

DEFAULT_MEMORY_MB = 1024  # user SQL's memory budget (server and CLI), MB
MAX_MEMORY_MB = 1 << 20
SAMPLE_S = 0.005  # how often the watchdog looks at the time and at DuckDB's accounting
GRACE_S = 0.02  # a query younger than this is not sampled: a point query never pays for a look at DuckDB's memory
TRIGGER = 0.25  # the share of the budget at which the watchdog interrupts
QUERY_TAGS = ("ALLOCATOR", "HASH_TABLE", "ORDER_BY", "WINDOW")  # DuckDB's memory tags of query intermediates
READERS = max(2, min(16, 2 * (os.cpu_count() or 1)))  # user queries at once in a process


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


class ReaderGate:
    """A pool of reader slots, served first come first served, and a way to have it to oneself.

    ``enter`` takes one of ``size`` slots, in the order readers asked for one (a reader that arrives while others
    wait queues behind them, so no query waits for ever while later ones pass it: that is what keeps the tail of the
    latency close to its median under many clients). ``alone`` takes them all (it waits for the readers inside to
    leave, and readers arriving after it wait for it). Both give up at a deadline.

    Each waiting reader sleeps on a condition of its own, and a slot given back wakes only the first in line: with
    many clients, waking every waiter on every release cost each request a dozen thread switches through the GIL.
    """

    def __init__(self, size: int = READERS):
        self.size = size
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # what `alone` waits on
        self._inside = 0
        self._alone = False
        self._waiting_alone = 0
        self._queue: deque[threading.Condition] = deque()  # the readers waiting for a slot, first come first

    def _open(self) -> bool:
        return not (self._alone or self._waiting_alone or self._inside >= self.size)

    def _wake(self) -> None:
        """With the lock held: wake the first reader in line if a slot is free, else `alone` once nobody is inside."""
        if self._queue and self._open():
            self._queue[0].notify()
        if self._waiting_alone and not self._inside:
            self._cond.notify_all()

    def enter(self, deadline: float) -> bool:
        """Take a slot before ``deadline`` (a ``time.perf_counter()`` value); False if none came free in time."""
        with self._lock:
            if not self._queue and self._open():
                self._inside += 1
                return True
            mine = threading.Condition(self._lock)
            self._queue.append(mine)
            try:
                while not (self._queue[0] is mine and self._open()):
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        return False
                    mine.wait(left)
                self._inside += 1
                return True
            finally:
                self._queue.remove(mine)
                self._wake()  # the next in line may take a slot still free

    def waiting(self) -> int:
        """Readers queued for a slot now."""
        return len(self._queue)

    def leave(self) -> None:
        """Give a slot back."""
        with self._lock:
            self._inside -= 1
            self._wake()

    def alone(self, deadline: float) -> bool:
        """Take the whole pool before ``deadline``; False if the readers inside did not leave in time."""
        with self._lock:
            self._waiting_alone += 1
            try:
                while self._alone or self._inside:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                self._alone = True
                return True
            finally:
                self._waiting_alone -= 1
                self._wake()

    def leave_alone(self) -> None:
        """Give the whole pool back."""
        with self._lock:
            self._alone = False
            self._cond.notify_all()  # another `alone` waiting
            self._wake()

    def busy(self) -> int:
        """Readers inside now."""
        return self._inside


GATE = ReaderGate()


def intermediates(probe: duckdb.DuckDBPyConnection) -> int:
    """Bytes DuckDB accounts now to query intermediates (`QUERY_TAGS`) in the instance of ``probe``."""
    tags = ", ".join(f"'{t}'" for t in QUERY_TAGS)
    row = probe.execute(f"SELECT sum(memory_usage_bytes) FROM duckdb_memory() WHERE tag IN ({tags})").fetchone()
    return int(row[0] or 0)


class Watchdog:
    """Interrupts one connection's query past a time limit or a memory budget (see the module's docstring).

    Args:
        con: The connection running the query.
        time_limit: Seconds from ``start``.
        budget: The query's memory budget, bytes; it is interrupted at `TRIGGER` of it.
        start: ``time.perf_counter()`` when the request began (waiting for a slot counts).
        probe: Opens another connection to the same DuckDB instance, to read its accounting while the query runs
            (called once, by the watchdog's thread, when the query has run `GRACE_S`).
        instance: Names the DuckDB instance (queries of one instance see each other's intermediates).
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, time_limit: float, budget: int, start: float,
                 probe: Callable[[], duckdb.DuckDBPyConnection], instance: str):
        self.con, self.time_limit, self.budget, self.start = con, time_limit, budget, start
        self.instance = instance
        self._open_probe = probe
        self._probe: duckdb.DuckDBPyConnection | None = None
        self._probe_lock = threading.Lock()
        self._closed = False
        self.timed_out = threading.Event()
        self.over_memory = threading.Event()
        self.peak_growth = 0
        self.shared = False  # another user query ran in the same instance while this one was watched
        self.began = 0.0
        self.base: int | None = None

    def __enter__(self) -> Watchdog:
        self.began = time.perf_counter()
        _MONITOR.add(self)
        return self

    def __exit__(self, *exc) -> None:
        _MONITOR.remove(self)
        with self._probe_lock:
            self._closed = True
            if self._probe is not None:
                self._probe.close()

    def used(self) -> int | None:
        """DuckDB's accounting of query intermediates in this query's instance now (None once it has ended)."""
        with self._probe_lock:
            if self._closed:
                return None
            try:
                if self._probe is None:
                    self._probe = self._open_probe()
                return intermediates(self._probe)
            except duckdb.Error:
                return None

    def elapsed(self) -> float:
        """Seconds since the request began."""
        return time.perf_counter() - self.start

    def stopped(self) -> bool:
        """Whether the watchdog interrupted the query."""
        return self.timed_out.is_set() or self.over_memory.is_set()

    def _stop(self) -> None:
        self.con.interrupt()  # repeated until the query ends: an interrupt lands between DuckDB's steps


class _Monitor:
    """One thread for every running query: it looks at each one's clock, and at DuckDB's accounting per instance.

    It sleeps until a query can need it: when the youngest grows past `GRACE_S` or the first time limit falls due,
    so point queries never wake it; while a query older than that runs, it looks every `SAMPLE_S`. Queries of one
    instance that overlap are marked shared as they start.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._watches: set[Watchdog] = set()
        self._thread: threading.Thread | None = None
        self._due = math.inf  # when the thread, asleep, next looks

    def add(self, watch: Watchdog) -> None:
        with self._cond:
            for other in self._watches:
                if other.instance == watch.instance:
                    other.shared = watch.shared = True
            self._watches.add(watch)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="geomap-sql-watchdog", daemon=True)
                self._thread.start()
            elif _due(watch, time.perf_counter()) < self._due:
                self._cond.notify()

    def remove(self, watch: Watchdog) -> None:
        with self._cond:
            self._watches.discard(watch)

    def _run(self) -> None:
        idle_since = time.perf_counter()
        while True:
            with self._cond:
                now = time.perf_counter()
                watches = list(self._watches)
                if not watches and now - idle_since > 1.0:
                    self._thread = None
                    return
                due = min((_due(w, now) for w in watches), default=now + 0.1)
                if due > now:
                    self._due = due
                    self._cond.wait(due - now)
                    self._due = math.inf
                    continue
            idle_since = now
            self._look(watches)
            time.sleep(SAMPLE_S)

    def _look(self, watches: list[Watchdog]) -> None:
        now = time.perf_counter()
        instances: dict[str, list[Watchdog]] = {}
        for w in watches:
            if w.elapsed() > w.time_limit:
                w.timed_out.set()
            instances.setdefault(w.instance, []).append(w)
        for group in instances.values():
            old = [w for w in group if now - w.began >= GRACE_S and not w.stopped()]
            used = next((u for w in old if (u := w.used()) is not None), None)
            if used is not None:
                for w in old:
                    if w.base is None:
                        w.base = used
                    w.peak_growth = max(w.peak_growth, used - w.base)
                    if used - w.base > w.budget * TRIGGER:
                        w.over_memory.set()
        for w in watches:
            if w.stopped():
                w._stop()


def _due(watch: Watchdog, now: float) -> float:
    """When the monitor must next look at ``watch``.

    Now once it is past `GRACE_S` or stopped; else at its grace's end or its time limit, whichever comes first.
    """
    if watch.stopped() or now - watch.began >= GRACE_S:
        return now
    return min(watch.began + GRACE_S, watch.start + watch.time_limit)


_MONITOR = _Monitor()

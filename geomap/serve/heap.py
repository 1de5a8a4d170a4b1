"""The server's heap over a long life: freed memory handed back after each job, long-lived objects frozen.

A served process runs many threads (uvicorn's loop, a pool of query threads, DuckDB's workers, the job and fit
workers). glibc keeps what they free for reuse, so a server that ingests job after job between queries can hold
freed pages no one uses; `trim` returns them at the end of each job (`malloc_trim`, a few milliseconds).
Capping glibc's arenas (``mallopt(M_ARENA_MAX, 2)``) was tried and dropped: the server's threads contended for
them, and the load bench lost about a fifth of its throughput (2026-12-02, quiet). `trim` does nothing where the C
library is not glibc.

Python's cyclic collector walks every tracked object in a full collection: imported modules, FastAPI's routes,
DuckDB's and pyarrow's types and, once a job has loaded one, torch and the model (about 400k objects: 250 ms a
walk). Measured on 2026-12-03 in the load bench's job phases: the first job's model load set off 16 full
collections of 100-490 ms each while 16 clients waited, and at idle one full collection stopped the server for
81 ms. So the server loads a model with collection paused (`paused`), and `settle`s (collects once, then freezes
what lives, `gc.freeze`) after start-up, after a model load and after each job: a later collection walks only
what the requests made since. A settle walks only what is not frozen, except every `FULL_EVERY`-th, which walks
everything once more, to free the cycles that frozen objects left when they were dropped.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import itertools
from collections.abc import Iterator


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def trim() -> bool:
    """Return the heap's free pages to the system; whether any were returned."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


FULL_EVERY = 8  # one settle in this many walks the frozen objects too
_settles = itertools.count(1)


def settle(full: bool = False) -> None:
    """Collect cyclic garbage, then keep every object alive now out of later collections' walks.

    Frozen objects are still freed by reference counting when they are dropped; only a cycle among them waits for
    a full settle (``full``, and every `FULL_EVERY`-th call), which unfreezes, collects and freezes again.
    """
    if full or next(_settles) % FULL_EVERY == 0:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Collection paused for the block (a model load, whose every object lives on), then one `settle`."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        settle()

"""The server's heap over a long life: freed memory handed back after each job, long-lived objects frozen.

A served process runs many threads (uvicorn's loop, a pool of query threads, DuckDB's workers, the job and fit
workers). glibc keeps what they free for reuse, so a server that ingests job after job between queries can hold
freed pages no one uses; `trim` returns them at the end of each job (`malloc_trim`, a few milliseconds).
Capping glibc's arenas (``mallopt(M_ARENA_MAX, 2)``) was tried and dropped: the server's threads contended for
them, and the load bench lost about a fifth of its throughput (2026-12-02, quiet). `trim` does nothing where the C
library is not glibc.

Python's cyclic collector walks every tracked object in a full collection: imported modules, FastAPI's routes,
DuckDB's and pyarrow's types and, once a job has run, torch and the loaded model. In a load bench (2026-12-03) one
full collection stopped the server for 81 ms in the middle of 16 clients' requests, which is the size of the whole
p99 bar. `settle` collects once and freezes what is alive (`gc.freeze`), after start-up and after each job, so a
later full collection walks only what the requests made since.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


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


def settle() -> None:
    """Collect cyclic garbage once, then keep every object alive now out of later collections' walks.

    Frozen objects are still freed by reference counting when they are dropped; only a cycle among them is left
    to the next `settle` (which unfreezes, collects and freezes again).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()

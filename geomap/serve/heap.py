"""The server's heap over a long life: freed memory handed back after each job.

A served process runs many threads (uvicorn's loop, a pool of query threads, DuckDB's workers, the job and fit
workers). glibc keeps what they free for reuse, so a server that ingests job after job between queries can hold
freed pages no one uses; `trim` returns them at the end of each job (`malloc_trim`, a few milliseconds).
Capping glibc's arenas (``mallopt(M_ARENA_MAX, 2)``) was tried and dropped: the server's threads contended for
them, and the load bench lost about a fifth of its throughput (2026-12-02, quiet). `trim` does nothing where the C
library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


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

"""The server's heap over a long life: freed memory handed back after each job.

A served process runs many threads (uvicorn's loop, a pool of query threads, DuckDB's workers, the job and fit
workers). glibc keeps what they free for reuse, so a server that ingests job after job between queries can hold
freed pages no one uses; `trim` returns them at the end of each job (`malloc_trim`, a few milliseconds).
`limit_arenas` caps glibc's arenas; the server does not call it: with two arenas its threads contended for them, and
the load bench lost about a fifth of its throughput (2026-12-02, quiet). Both do nothing where the C library is not
glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_ARENA_MAX = -8  # mallopt's parameter number (glibc's malloc.h)
ARENAS = 2


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas (call before the server's threads start); whether it took effect."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_ARENA_MAX, int(arenas)))


def trim() -> bool:
    """Return the heap's free pages to the system; whether any were returned."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))

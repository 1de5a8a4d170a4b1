"""A running top-k over logits streamed block by block: one min-heap per row, updated in one compiled pass.

``torch.topk`` costs a few nanoseconds per logit; a heap only compares each logit with its row's current k-th
best, and most logits of a large vocabulary lose that comparison, so the pass runs near memory speed.
"""

from __future__ import annotations

import os

import numpy as np

_KERNEL = None


def _kernel():
    """The compiled update (numba, cached under ``$GEOMAP_HOME``), compiled on first use."""
    global _KERNEL
    if _KERNEL is None:
        from geomap.models.presets import cache_home

        os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_home() / "numba"))
        import numba

        @numba.njit(parallel=True, cache=True, nogil=True, fastmath=False)
        def update(z, offset, heap_v, heap_i):  # pragma: no cover - compiled
            n, c = z.shape
            k = heap_v.shape[1]
            for r in numba.prange(n):
                hv, hi = heap_v[r], heap_i[r]
                floor = hv[0]
                for j in range(c):
                    v = z[r, j]
                    if v > floor:  # replace the root (the row's k-th best) and sift it down
                        pos = 0
                        while True:
                            child = 2 * pos + 1
                            if child >= k:
                                break
                            if child + 1 < k and hv[child + 1] < hv[child]:
                                child += 1
                            if hv[child] >= v:
                                break
                            hv[pos], hi[pos] = hv[child], hi[child]
                            pos = child
                        hv[pos], hi[pos] = v, offset + j
                        floor = hv[0]

        _KERNEL = update
    return _KERNEL


class RunningTopK:
    """The k largest values (and their column ids) of each of ``n`` rows, fed block by block.

    Args:
        n: Rows.
        k: How many to keep per row.
    """

    def __init__(self, n: int, k: int):
        self.values = np.full((n, k), -np.inf, dtype=np.float32)
        self.ids = np.full((n, k), -1, dtype=np.int64)

    def update(self, block: np.ndarray, offset: int) -> None:
        """Offer a float32 block (n, c) whose column j is id ``offset + j``."""
        _kernel()(np.ascontiguousarray(block, dtype=np.float32), offset, self.values, self.ids)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(values, ids)`` (n, k), best first."""
        order = np.argsort(-self.values, axis=1, kind="stable")
        return np.take_along_axis(self.values, order, 1), np.take_along_axis(self.ids, order, 1)

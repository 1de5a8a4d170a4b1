"""Map fits of the server as background jobs: a report never fits a map inside a request.

A journey or compare page shows its run's joint PCA map (the UMAP map is no longer drawn there, so it is not fitted
for a page). The report stage needs it stored; a fit over a large run takes long, and a request must not wait. So
the server checks beforehand (`missing`), and when a map is missing it queues a fit here and answers at once (202,
a page that reloads itself); the page renders once the maps are stored. One worker fits one run at a time, at most
`MAX_PENDING` runs wait, and a run is queued once however many requests ask for it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from geomap.errors import GeomapError
from geomap.store.handle import Store

log = logging.getLogger("geomap.serve")
METHODS = ("pca",)  # the maps a journey page draws (see geomap.report.data)
MAX_PENDING = 4


class FitsBusy(GeomapError):
    """Too many runs are waiting for their maps."""

    http_status = 503


@dataclass
class Fit:
    """The state of one run's map fit."""

    run_id: int
    methods: tuple[str, ...]
    status: str = "queued"  # queued, running, done, failed
    submitted: float = field(default_factory=time.time)
    error: str | None = None


def missing(rows: Callable[..., list[dict]], run_id: int) -> tuple[str, ...]:
    """The map methods a run's journey pages need that the store does not hold yet."""
    have = {r["method"] for r in rows("SELECT DISTINCT method FROM projections WHERE run_id = ? AND joint AND "
                                      "method IN ('pca', 'umap')", run_id)}
    return tuple(m for m in METHODS if m not in have)


def _weights(store: Store, run_id: int):
    """The run's weight slice beside the store (fits need no model when it is there), or None."""
    from geomap.analysis.weights import has_weights, weights_for

    sha = store.query("SELECT weights_sha256 FROM runs WHERE id = ?", [run_id]).scalar()
    return weights_for(store.path, sha) if sha and has_weights(store.path, sha) else None


class FitRunner:
    """One daemon thread fitting runs' maps, in the order asked.

    Args:
        store: The served store.
        model_for_run: Returns the loaded model of a run.
    """

    def __init__(self, store: Store, model_for_run: Callable[[int], object]):
        self.store, self._model_for_run = store, model_for_run
        self._queue: queue.Queue[Fit | None] = queue.Queue()
        self._fits: dict[int, Fit] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="geomap-fits", daemon=True)
        self._thread.start()

    def request(self, run_id: int, methods: tuple[str, ...]) -> Fit:
        """Queue a fit of ``methods`` for a run unless one is queued or running; the fit's state.

        Raises:
            FitsBusy: `MAX_PENDING` runs already wait.
        """
        with self._lock:
            fit = self._fits.get(run_id)
            if fit is not None and fit.status in ("queued", "running", "done"):
                return fit
            if fit is not None and fit.status == "failed":
                self._fits.pop(run_id)  # reported once; a new request tries again
                return fit
            if sum(f.status == "queued" for f in self._fits.values()) >= MAX_PENDING:
                raise FitsBusy(f"The server is fitting the maps of {MAX_PENDING} other runs; try again later.")
            fit = self._fits[run_id] = Fit(run_id, methods)
        self._queue.put(fit)
        return fit

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker after the current fit (waiting up to ``timeout``)."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while (fit := self._queue.get()) is not None:
            fit.status = "running"
            try:
                from geomap.analysis.maps import project  # on the first fit: importing torch holds the GIL for
                                                          # seconds, which a server's first queries would wait on
                loaded = _weights(self.store, fit.run_id) or self._model_for_run(fit.run_id)
                for method in fit.methods:
                    project(self.store, fit.run_id, method, loaded=loaded)
                fit.status = "done"
            except Exception as exc:  # noqa: BLE001 - reported to the next request for the page
                fit.status, fit.error = "failed", f"{type(exc).__name__}: {exc}"
                log.error("fitting the maps of run %d failed:\n%s", fit.run_id, traceback.format_exc())

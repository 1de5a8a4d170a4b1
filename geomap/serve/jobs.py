"""Background ingestion jobs of the server: one worker thread, so the server stays the store's single writer."""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from geomap.capture.config import CaptureConfig
from geomap.ingest.engine_config import EngineConfig
from geomap.serve import heap
from geomap.store.handle import Store
from geomap.store.writer import PromptSpec

log = logging.getLogger("geomap.serve")


@dataclass(frozen=True)
class JobSpec:
    """What to ingest: prompts, the model (a name the server may load), capture options, storage dtype, engine."""

    prompts: tuple[PromptSpec, ...]
    model: str
    capture: CaptureConfig
    vector_dtype: str = "float32"
    batch_size: int = 8
    pipeline: str = "ingest"
    engine: EngineConfig = field(default_factory=EngineConfig)
    interventions: tuple = ()  # `geomap.ingest.intervention_plan.InterventionSchema` sweeps run after the prompts


@dataclass
class Job:
    """A job's state, as ``GET /runs/{id}`` shows it (progress keys follow `geomap.ingest.engine.ingest`)."""

    run_id: int
    spec: JobSpec
    status: str = "queued"  # queued, running, done, failed
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    progress: dict = field(default_factory=dict)
    error: str | None = None

    def view(self) -> dict:
        """A JSON-ready summary."""
        now = self.finished or time.time()
        return {"run_id": self.run_id, "status": self.status, "pipeline": self.spec.pipeline, "model": self.spec.model,
                "engine": self.spec.engine.kind,
                "prompts": len(self.spec.prompts), "progress": dict(self.progress), "error": self.error,
                "queued_s": round((self.started or now) - self.submitted, 3),
                "running_s": None if self.started is None else round(now - self.started, 3)}


class JobRunner:
    """Runs ingestion jobs one at a time in a daemon thread.

    Args:
        store: The served store.
        model: Returns the loaded model for a name (the server's cache).
        reserve: Inserts a ``queued`` run row and returns its id (so a job has its run id from the start).
        fail: Marks a run ``failed`` after an error.
    """

    def __init__(self, store: Store, model: Callable, reserve: Callable[[str], int], fail: Callable[[int], None]):
        self.store, self._model, self._reserve, self._fail = store, model, reserve, fail
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="geomap-jobs", daemon=True)
        self._thread.start()

    def submit(self, spec: JobSpec) -> Job:
        """Queue a job; its run row exists (``queued``) when this returns."""
        with self._lock:
            job = Job(self._reserve(spec.pipeline), spec)
            self._jobs[job.run_id] = job
        self._queue.put(job)
        return job

    def get(self, run_id: int) -> Job | None:
        """The job that fills run ``run_id``, if this server ran or queued it."""
        return self._jobs.get(run_id)

    def busy(self) -> bool:
        """Whether a job is queued or running."""
        return any(j.status in ("queued", "running") for j in self._jobs.values())

    def stop(self, timeout: float = 5.0) -> None:
        """Let the current job finish (up to ``timeout``) and stop the worker."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _stored(self, loaded, spec: JobSpec) -> list[list[int]]:
        """``[prompt id, run id]`` of every prompt of the job now in the store (new or stored before)."""
        from geomap.ingest.runs import model_identity
        from geomap.store.writer import prompt_key

        keys = [prompt_key(model_identity(loaded), spec.capture.to_json(), p.text) for p in spec.prompts]
        return [list(r) for r in self.store.query("SELECT id, run_id FROM prompts WHERE key IN (SELECT unnest(?)) "
                                                  "AND status = 'done' ORDER BY id", [keys])]

    def _ingest(self, job: Job):
        """Run a job's ingestion on its engine; returns the model (or its skeleton) and the run's summary."""
        spec = job.spec
        if spec.engine.kind == "ray":  # this server is the Ray driver and the store's one writer: it merges
            from geomap.ingest.ray_engine import ingest_ray
            from geomap.ingest.runs import RunOptions
            from geomap.models.skeleton import skeleton_model

            options = RunOptions(spec.capture, spec.vector_dtype, spec.batch_size, spec.pipeline, progress=False,
                                 run_id=job.run_id, on_progress=job.progress.update)
            summary = ingest_ray(spec.model, list(spec.prompts), self.store, options, engine=spec.engine)
            return skeleton_model(spec.model), summary
        from geomap.ingest.engine import ingest

        loaded = self._model(spec.model)
        return loaded, ingest(loaded, list(spec.prompts), self.store, spec.capture, spec.vector_dtype,
                              spec.batch_size, pipeline=spec.pipeline, progress=False, run_id=job.run_id,
                              on_progress=job.progress.update)

    def _intervene(self, job: Job) -> None:
        """Run a job's intervention sweeps after its prompts (the same worker: the server stays the one writer)."""
        from geomap.ingest.intervention_plan import run_plan

        spec, done = job.spec, []
        loaded = self._model(spec.model)
        for plan in spec.interventions:
            summary = run_plan(loaded, plan, self.store, spec.batch_size, config=spec.capture)
            done.append({"sweep": plan.sweep_name(), "run_id": summary.run_id, "stored": summary.stored,
                         "skipped": summary.skipped, "ids": list(summary.ids)})
            job.progress.update(interventions=list(done))

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            job.status, job.started = "running", time.time()
            try:
                loaded, summary = self._ingest(job)
                job.progress.update(stored=summary.stored, skipped=summary.skipped, failed=summary.failed,
                                    tokens=summary.tokens, seconds=round(summary.seconds, 3),
                                    failures=list(summary.failures), prompts=self._stored(loaded, job.spec),
                                    recorded=summary.run_id is not None)  # the final counts, empty runs' too
                if job.spec.interventions:
                    self._intervene(job)
                job.status = "done"
            except Exception as exc:  # noqa: BLE001 - a job's failure is reported through GET /runs/{id}
                job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
                log.error("run %d failed:\n%s", job.run_id, traceback.format_exc())
                try:
                    self._fail(job.run_id)
                except Exception:  # noqa: BLE001, S110 - the job's own error is the one to report
                    pass
            finally:
                job.finished = time.time()
                heap.settle()  # torch and the model stay: out of later full collections' walks
                heap.trim()  # a job's batches were freed: give their pages back rather than hold them for reuse

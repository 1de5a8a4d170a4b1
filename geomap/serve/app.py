"""``geomap serve``: the store over HTTP, as a FastAPI application that owns the DuckDB file.

Design (see docs/architecture.md, "Serving"): the process opens the store once, as one DuckDB instance locked down
with `geomap.store.sql.sql_connection_config` (no file, network or extension access; settings locked). geomap's own
writer needs none of that, so the lockdown costs it nothing. The server holds that instance as one
`geomap.store.handle.Store` for its life; every request and the ingestion worker take cursors of it; read-only work,
user SQL included, runs in READ ONLY transactions (`Store.snapshot`), which give it a snapshot and let DuckDB itself
refuse any write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from geomap.errors import GeomapError
from geomap.serve import heap
from geomap.serve.admission import Admission
from geomap.serve.fits import FitRunner
from geomap.serve.jobs import JobRunner
from geomap.serve.security import BODY_TIMEOUT_S, LOOPBACK_NAMES, BodyTimeout, BodyTooLarge, Perimeter
from geomap.store.db import INGEST_MEMORY, WRITE_CHECKPOINT_THRESHOLD, NotFoundError, StoreError, ensure_schema
from geomap.store.handle import Store
from geomap.store.sql import sql_connection_config
from geomap.store.sql_budget import DEFAULT_MEMORY_MB, GATE
from geomap.store.sql_result import json_value

log = logging.getLogger("geomap.serve")


@dataclass
class Settings:
    """How a server runs.

    Attributes:
        db_path: The store it owns.
        token: Bearer token required on every request but ``/healthz`` (None: none; loopback binds only).
        allowed_hosts: Names accepted in ``Host``/``Origin`` besides the loopback names.
        max_body: Largest request body, bytes.
        sql_time_limit: Upper bound on a query's time limit, seconds.
        sql_max_rows: Upper bound on a query's row cap.
        sql_memory_mb: The memory budget of one user query, MB (see `geomap.store.sql_budget`).
        models: Model names or directories jobs may load (default: the presets), besides the models of stored runs;
            the first is the default model of jobs.
        pipelines: Folder of pipeline TOML files that ``POST /runs {"pipeline": NAME}`` may run.
        preloaded: Already loaded models by name (tests, notebooks).
        ray_jobs: Whether jobs may run on Ray (started on this machine); off, they are refused.
    """

    db_path: Path
    token: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_body: int = 1_000_000
    sql_time_limit: float = 10.0
    sql_max_rows: int = 10_000
    sql_memory_mb: float = DEFAULT_MEMORY_MB
    models: tuple[str, ...] = ()
    pipelines: Path = Path("pipelines")
    preloaded: dict = field(default_factory=dict)
    ray_jobs: bool = False


class Server:
    """What the routes share: settings, the open store, the loaded models, the job runner, a lock for report writes."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.db_path = settings.db_path.resolve()
        self._store: Store | None = None
        self._models = dict(settings.preloaded)
        self._model_lock = threading.Lock()
        self.report_lock = threading.Lock()  # reports may persist analyses (projections, geometry): one at a time
        self.jobs: JobRunner | None = None
        self.fits: FitRunner | None = None
        self._reserved = 0  # the largest run id this server reserved (`_reserve`)

    @property
    def store(self) -> Store:
        """The store this server opened for its life (between `start` and `stop`)."""
        if self._store is None:
            raise StoreError(f"The server has not opened {self.db_path}.")
        return self._store

    @property
    def default_model(self) -> str:
        """The model of jobs that name none: the first ``--model``, else the default preset."""
        from geomap.models.presets import DEFAULT_MODEL

        return (self.settings.models or (DEFAULT_MODEL,))[0]

    def rows(self, sql: str, *params) -> list[dict]:
        """One read-only query in its own snapshot, as JSON-ready dicts."""
        return [{c: json_value(v) for c, v in row.items()} for row in self.store.query(sql, list(params)).dicts()]

    def allowed_model(self, name: str) -> bool:
        """The ``--model`` names (else the presets), preloaded models, and the models of stored runs."""
        from geomap.models.presets import PRESETS

        if name in (self.settings.models or tuple(PRESETS)) or name in self._models:
            return True
        return bool(self.rows("SELECT count(*) AS n FROM runs WHERE model = ?", name)[0]["n"])

    def model(self, name: str):
        """The loaded model for a name, loaded once and kept."""
        with self._model_lock:
            if name not in self._models:
                from geomap.models import load_model

                with heap.paused():  # one collection after the load, not a dozen of a growing heap during it
                    self._models[name] = load_model(name)
            return self._models[name]

    def model_for_run(self, run_id: int):
        """The model that computed a stored run."""
        found = self.rows("SELECT model FROM runs WHERE id = ?", run_id)
        if not found or found[0]["model"] is None:
            raise NotFoundError(f"No finished run with id {run_id}.")
        return self.model(found[0]["model"])

    def model_for_prompt(self, prompt_id: int):
        """The model that computed a stored prompt."""
        found = self.rows("SELECT run_id FROM prompts WHERE id = ?", prompt_id)
        if not found:
            raise NotFoundError(f"No stored prompt with id {prompt_id}.")
        return self.model_for_run(int(found[0]["run_id"]))

    def _reserve(self, pipeline: str) -> int:
        from geomap.ingest.runs import reserve_run

        with self.store.writer() as con:
            ensure_schema(con)
            self._reserved = reserve_run(con, pipeline, above=self._reserved)  # a dropped empty run's id stays its
            return self._reserved

    def _fail(self, run_id: int) -> None:
        """After a job's error: drop its run row if the run never started (bad input), else mark the run failed.

        A job refused before its run started (layers the model lacks, a prompt too long) records no run, as the same
        command without a server; the job still answers under its id (`JobRunner.get`).
        """
        from geomap.ingest.runs import drop_queued, mark_failed

        with self.store.writer() as con:
            if drop_queued(con, run_id):
                return
        mark_failed(self.store, run_id)  # the run lifecycle's failure path, as an engine's own failure takes

    def start(self) -> None:
        """Open the store (one locked-down instance for the server's life) and start the job worker."""
        memory = os.environ.get("GEOMAP_INGEST_MEMORY", INGEST_MEMORY)  # the instance's cap, as `writer_settings`
        try:  # sets it for a private writer; a user query's DuckDB memory (operator_memory_limit) lives within it
            self._store = Store.open(self.db_path, "w", {**sql_connection_config(), "memory_limit": memory,
                                                         "checkpoint_threshold": WRITE_CHECKPOINT_THRESHOLD})
        except duckdb.InvalidInputException as exc:
            raise StoreError(f"GEOMAP_INGEST_MEMORY={memory!r} is not a memory size DuckDB accepts (e.g. 512MB, "
                             f"2GB): {str(exc).splitlines()[0]}") from None
        with self.store.writer() as con:
            ensure_schema(con)
            con.execute("DELETE FROM runs WHERE status = 'queued'")  # jobs a stop dropped before they started: no run
            con.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")  # a rerun takes them up
        self.jobs = JobRunner(self.store, self.model, self._reserve, self._fail)
        self.fits = FitRunner(self.store, self.model_for_run)

    def stop(self) -> None:
        """Stop the worker and close the store."""
        if self.jobs is not None:
            self.jobs.stop()
        if self.fits is not None:
            self.fits.stop()
        store, self._store = self._store, None
        try:
            if store is not None:
                store.close()
        except Exception as exc:  # noqa: BLE001 - a job still running at shutdown: the process exit closes the file
            log.warning("closing the store at shutdown: %s", exc)


def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one readable sentence first, then FastAPI's itemised errors."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            problems.append(f"malformed JSON in the request body at character {err['loc'][-1]}: {reason}")
        else:
            problems.append(f"{where}: {err.get('msg')}")
    errors = _finite(json.loads(json.dumps(exc.errors(), default=str)))
    return JSONResponse({"detail": "Invalid request: " + "; ".join(problems) + ".", "errors": errors}, status_code=422)


def _finite(value):
    """JSON-safe errors: NaN and infinities (which JSON cannot carry) become their names as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _warm_reports() -> None:
    """Import the report stage and load its templates while the server waits for its first request, then settle.

    A reader's first journey page then pays for its own data only, not for the imports and template loading every
    page shares. What start-up made is then frozen out of the collector's full walks (`heap.settle`).
    """
    try:
        from geomap.report import data  # noqa: F401
        from geomap.report.render import environment

        for name in ("journey.html.j2", "run.html.j2", "index.html.j2"):
            environment().get_template(name)
    except Exception:  # noqa: BLE001 (a warm-up only: the first page loads them itself)
        log.debug("report warm-up failed", exc_info=True)
    heap.settle(full=True)  # what start-up imported lives as long as the server: out of collections' walks


def create_app(settings: Settings) -> FastAPI:
    """The application, wrapped in its perimeter (Host/Origin checks, token, body size limit) and admission."""
    from geomap.serve.docs import router as docs_router
    from geomap.serve.report_routes import router as report_router
    from geomap.serve.routes import router

    server = Server(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        threading.Thread(target=_warm_reports, name="geomap-warm-reports", daemon=True).start()
        try:
            yield
        finally:
            server.stop()

    from geomap.serve.encode import FastJSONResponse

    app = FastAPI(title="geomap", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  default_response_class=FastJSONResponse,
                  description="The journeys of tokens through a language model, stored in DuckDB and FAISS: runs, "
                              "prompts, trajectories, attention, lens, neighbours, read-only SQL, ingestion jobs "
                              "and HTML reports.")
    app.state.server = server
    app.include_router(router)
    app.include_router(report_router)
    app.include_router(docs_router)
    app.add_exception_handler(RequestValidationError, _validation)

    @app.exception_handler(GeomapError)
    async def geomap_error(request: Request, exc: GeomapError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.http_status)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": f"Request body too large: the limit is {settings.max_body} bytes."},
                            status_code=413)

    @app.exception_handler(BodyTimeout)
    async def too_slow(request: Request, exc: BodyTimeout) -> JSONResponse:
        return JSONResponse({"detail": f"The request body stopped arriving for {BODY_TIMEOUT_S:g} s."},
                            status_code=408, headers={"connection": "close"})

    hosts = {h.lower() for h in (*LOOPBACK_NAMES, *settings.allowed_hosts)}
    admitted = Admission(app, GATE.size, settings.sql_time_limit)  # read requests wait in line outside the app
    return Perimeter(admitted, hosts, settings.token, settings.max_body)  # type: ignore[return-value]


def _version() -> str:
    from importlib.metadata import version

    return version("geomap")

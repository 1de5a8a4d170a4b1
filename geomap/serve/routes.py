"""The server's endpoints: thin JSON views over the store, SQL, neighbours, ingestion jobs and reports."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from geomap.serve.admission import arrived
from geomap.serve.encode import ARROW_STREAM, arrow_response, dumps, wants_arrow
from geomap.store.scalars import of_prompt, relation
from geomap.store.sql import run_sql
from geomap.store.sql_budget import GATE
from geomap.store.sql_result import json_value

router = APIRouter()
RunId = Annotated[int, Path(ge=0, le=2**31 - 1, description="A run's id (`runs.id`).")]
PromptId = Annotated[int, Path(ge=0, le=2**31 - 1, description="A stored prompt's id (`prompts.id`).")]
Pos = Annotated[int | None, Query(ge=0, le=2**31 - 1, description="A token position (default: the prompt's last).")]
Limit = Annotated[int, Query(ge=1, le=1000, description="Rows to return, at most 1,000.")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="Rows to skip: the next page starts at limit + offset.")]
PIPELINE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"


def server_of(request: Request):
    """The `Server` behind a request."""
    return request.app.state.server


class Health(BaseModel):
    """Liveness, and which store this server owns (shown to authorised callers only)."""

    status: Literal["ok"]
    version: str
    db: str | None
    jobs_busy: bool
    sql_readers: dict[str, int] = Field(description="User queries running now (busy) and the reader pool's size.")


@router.get("/healthz", response_model=Health, tags=["meta"])
def healthz(request: Request) -> dict:
    """The server is up; with a valid token (or none needed) it also names its store."""
    server = server_of(request)
    token = server.settings.token
    given = request.headers.get("authorization", "").partition(" ")[2].strip()
    shown = token is None or given == token
    return {"status": "ok", "version": request.app.version, "db": str(server.db_path) if shown else None,
            "jobs_busy": server.jobs.busy() if server.jobs else False,
            "sql_readers": {"busy": GATE.busy(), "slots": GATE.size}}


# ---- runs and prompts ----------------------------------------------------------------------------------------------

@router.get("/runs", tags=["runs"])
def list_runs(request: Request, limit: Limit = 100, offset: Offset = 0) -> list[dict]:
    """Stored runs, newest first."""
    return server_of(request).rows("SELECT r.id, started_at, finished_at, r.status, pipeline, model, model_type, "
                 "vector_dtype, n_layers, d_model, n_heads, coalesce(n.n, 0) AS n_prompts FROM runs r LEFT JOIN "
                 "(SELECT run_id, count(*) AS n FROM prompts GROUP BY run_id) n ON n.run_id = r.id "
                 "ORDER BY r.id DESC LIMIT ? OFFSET ?", limit, offset)


class PromptIn(BaseModel):
    """One prompt to ingest."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=100_000)
    tags: list[Annotated[str, Field(max_length=200)]] = Field(default_factory=list, max_length=32)
    source_id: str | None = Field(default=None, max_length=200)


class EngineIn(BaseModel):
    """The engine of a job: this server's process (inline), or Ray workers it starts on its machine."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["inline", "ray"] = "inline"
    workers: int | None = Field(default=None, ge=1, le=256, description="Ray: model replicas (default: one per "
                                                                         "GPU, else one per two cores).")

    @model_validator(mode="after")
    def _workers_need_ray(self) -> EngineIn:
        if self.kind == "inline" and self.workers is not None:
            raise ValueError("engine.workers applies to the Ray engine: give engine.kind 'ray'")
        return self


class RunRequest(BaseModel):
    """An ingestion job: inline prompts, or the name of a pipeline in the server's pipelines folder."""

    model_config = ConfigDict(extra="forbid")
    prompts: list[PromptIn | Annotated[str, Field(min_length=1, max_length=100_000)]] | None = Field(
        default=None, min_length=1, max_length=10_000)
    pipeline: str | None = Field(default=None, pattern=PIPELINE_NAME)
    name: str = Field(default="api", pattern=PIPELINE_NAME, description="Recorded as the run's pipeline name.")
    model: str | None = Field(default=None, max_length=300,
                              description="Default: the pipeline's, else the server's first --model or the preset.")
    capture: dict[str, Any] = Field(default_factory=dict, description="CaptureConfig fields, e.g. attn_positions.")
    vector_dtype: Literal["float32", "bfloat16"] = "float32"
    batch_size: int = Field(default=8, ge=1, le=256)
    engine: EngineIn | None = Field(default=None, description="Default: the pipeline's [engine] (no cluster "
                                                              "address comes over HTTP), else inline.")
    interventions: list[dict[str, Any]] | None = Field(
        default=None, max_length=64, description="Intervention sweeps run after the prompts, each as a pipeline's "
                                                 "[[interventions]] table (docs/interventions.md). Default: the "
                                                 "pipeline's.")

    @model_validator(mode="after")
    def _one_source(self) -> RunRequest:
        if (self.prompts is None) == (self.pipeline is None):
            raise ValueError("give exactly one of 'prompts' (inline) or 'pipeline' (a name)")
        return self


def _engine(base, asked: EngineIn | None):
    """The job's engine: ``base`` (the pipeline's, else inline) with the request's kind and workers over it."""
    return base if asked is None else base.override(asked.kind, None, asked.workers)


def _job_spec(server, body: RunRequest):
    from geomap.capture.config import CaptureConfig
    from geomap.ingest.engine_config import EngineConfig
    from geomap.ingest.pipeline import load_pipeline
    from geomap.serve.jobs import JobSpec
    from geomap.store.writer import PromptSpec

    if body.pipeline is not None:
        path = (server.settings.pipelines / f"{body.pipeline}.toml").resolve()
        if path.parent != server.settings.pipelines.resolve() or not path.exists():
            raise HTTPException(404, f"No pipeline named {body.pipeline!r} in the server's pipelines folder.")
        pipe = load_pipeline(path)
        spec = JobSpec(tuple(pipe.prompts()), body.model or pipe.model, pipe.capture, pipe.vector_dtype,
                       pipe.batch_size, pipe.name, _engine(pipe.engine, body.engine))
    else:
        _whole_numbers(body.capture, "capture")
        try:
            capture = CaptureConfig(**body.capture)  # it turns JSON lists into tuples itself
        except (TypeError, ValueError) as exc:
            raise HTTPException(422, f"Invalid request: capture: {exc}.") from None
        prompts = tuple(PromptSpec(p, source="api") if isinstance(p, str) else
                        PromptSpec(p.text, source="api", source_id=p.source_id, tags=tuple(p.tags))
                        for p in body.prompts or [])
        spec = JobSpec(prompts, body.model or server.default_model, capture, body.vector_dtype, body.batch_size,
                       body.name, _engine(EngineConfig(), body.engine))
    if body.interventions is not None:
        spec = dataclasses.replace(spec, interventions=_plans(body.interventions))
    elif body.pipeline is not None:
        spec = dataclasses.replace(spec, interventions=pipe.interventions)
    if spec.engine.kind == "ray" and not server.settings.ray_jobs:
        raise HTTPException(403, "This server runs jobs inline: start it with `geomap serve --ray` to let jobs run "
                                 "on Ray.")
    if not server.allowed_model(spec.model):
        raise HTTPException(403, f"This server does not load model {spec.model!r}: it loads its --model names (else "
                                 "the presets) and the models of stored runs.")
    return spec


def _plans(entries: list[dict]) -> tuple:
    """Validate a request's intervention sweeps (422 with the one-line message of the pipeline schema)."""
    from geomap.ingest.intervention_plan import validate_plan
    from geomap.intervene.sites import InterventionError

    try:
        return tuple(validate_plan(entry, f"interventions[{i}]") for i, entry in enumerate(entries))
    except InterventionError as exc:
        raise HTTPException(422, f"Invalid request: {exc}.") from None


def _whole_numbers(value: Any, where: str) -> None:
    """Refuse any number in a capture mapping that is not a whole number.

    NaN, Infinity and 2.5 pass JSON, but no capture option takes them.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            _whole_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _whole_numbers(item, f"{where}[{i}]")
    elif isinstance(value, float):
        raise HTTPException(422, f"Invalid request: {where}: must be a whole number, not {value!r}.")


@router.post("/runs", status_code=202, tags=["runs"])
def submit_run(request: Request, body: RunRequest) -> dict:
    """Queue an ingestion job; follow it with ``GET /runs/{run_id}``."""
    server = server_of(request)
    job = server.jobs.submit(_job_spec(server, body))
    return {**job.view(), "url": f"/runs/{job.run_id}"}


@router.get("/runs/{run_id}", tags=["runs"])
def get_run(request: Request, run_id: RunId) -> dict:
    """A run's row, and the progress of the job filling it (when this server runs or ran it)."""
    server = server_of(request)
    rows = server.rows("SELECT * EXCLUDE (capture_config), capture_config::VARCHAR AS capture_config, "
                         "(SELECT count(*) FROM prompts p WHERE p.run_id = r.id) AS n_prompts FROM runs r "
                         "WHERE id = ?", run_id)
    job = server.jobs.get(run_id)
    if not rows and job is None:
        raise HTTPException(404, f"No run with id {run_id}.")
    out = rows[0] if rows else {"id": run_id}
    if job is not None:
        out["job"] = job.view()
    return out


@router.get("/prompts", tags=["prompts"])
def list_prompts(request: Request, limit: Limit = 100, offset: Offset = 0,
                 run_id: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="Only this run's prompts.")]
                 = None) -> list[dict]:
    """Stored prompts (optionally of one run), by id."""
    where, params = ("WHERE run_id = ?", [run_id]) if run_id is not None else ("", [])
    return server_of(request).rows(f"SELECT id, run_id, text, tags, n_tokens, status, parent_id FROM prompts {where} "
                                   "ORDER BY id LIMIT ? OFFSET ?", *params, limit, offset)


def _prompt(server, prompt_id: int) -> dict:
    rows = server.rows("SELECT id, run_id, text, source, source_id, tags, n_tokens, status, error, truncated, "
                         "parent_id, decoding::VARCHAR AS decoding FROM prompts WHERE id = ?", prompt_id)
    if not rows:
        raise HTTPException(404, f"No stored prompt with id {prompt_id}.")
    return rows[0]


def _pos(prompt: dict, pos: int | None) -> int:
    last = (prompt["n_tokens"] or 1) - 1
    if pos is None:
        return last
    if not 0 <= pos <= last:
        raise HTTPException(404, f"Prompt {prompt['id']} has positions 0..{last}, not {pos}.")
    return pos


@router.get("/prompts/{prompt_id}", tags=["prompts"])
def get_prompt(request: Request, prompt_id: PromptId) -> dict:
    """A prompt and its tokens (id, text, raw bytes as hex, special, generated)."""
    server = server_of(request)
    out = _prompt(server, prompt_id)
    out["tokens"] = server.rows("SELECT pos, token_id, text, hex(raw) AS raw_hex, special, generated FROM tokens "
                                  "WHERE prompt_id = ? ORDER BY pos", prompt_id)
    return out


def _rows_of(server, sql: Callable[[Any], str], *params) -> list[dict]:
    """`Server.rows` of a query whose text depends on the store (segment files or scalars to read), one snapshot."""
    with server.store.snapshot() as con:
        cur = con.execute(sql(con), list(params))
        names = [d[0] for d in cur.description]
        return [{c: json_value(v) for c, v in zip(names, row)} for row in cur.fetchall()]


@router.get("/prompts/{prompt_id}/trajectory", tags=["prompts"])
def get_trajectory(request: Request, prompt_id: PromptId, pos: Pos = None) -> dict:
    """One token's path through the layers: residual norm, cosine to the final state, lens top-1, entropy, KL."""
    server = server_of(request)
    p = _pos(_prompt(server, prompt_id), pos)
    layers = server.rows("SELECT layer, norm, cos_final, top1_id, top1_token, top1_prob, entropy, kl_to_final, "
                           "final_rank, final_prob FROM trajectory WHERE prompt_id = ? AND pos = ? ORDER BY layer",
                   prompt_id, p)
    return {"prompt_id": prompt_id, "pos": p, "layers": layers}


@router.get("/prompts/{prompt_id}/attention", tags=["prompts"])
def get_attention(request: Request, prompt_id: PromptId,
                  layer: Annotated[int, Query(ge=0, le=10_000, description="A decoder layer, 0..L-1.")],
                  pos: Pos = None) -> dict:
    """Every head's scaled scores and softmax weights at one layer, for one query position."""
    server = server_of(request)
    p = _pos(_prompt(server, prompt_id), pos)
    heads = _rows_of(server, lambda con: "SELECT head, entropy, scores, weights FROM "
                     f"{of_prompt(con, 'attention', prompt_id)} WHERE prompt_id = ? AND layer = ? AND pos = ? "
                     "ORDER BY head", prompt_id, layer, p)
    if not heads:
        raise HTTPException(404, f"No attention stored for prompt {prompt_id} at layer {layer}, position {p} "
                                 "(capture attn_positions decides which positions are kept).")
    return {"prompt_id": prompt_id, "layer": layer, "pos": p, "heads": heads}


@router.get("/prompts/{prompt_id}/lens", tags=["prompts"])
def get_lens(request: Request, prompt_id: PromptId, pos: Pos = None,
             top: Annotated[int, Query(ge=1, le=50, description="Lens candidates per layer, at most 50.")] = 10
             ) -> dict:
    """The logit lens at every layer: the top tokens and their probabilities."""
    server = server_of(request)
    prompt = _prompt(server, prompt_id)
    p = _pos(prompt, pos)
    layers = server.rows("SELECT layer, token_ids[1:?] AS token_ids, probs[1:?] AS probs FROM lens "
                           "WHERE prompt_id = ? AND pos = ? ORDER BY layer", top, top, prompt_id, p)
    ids = sorted({t for r in layers for t in r["token_ids"]})
    texts = {r["token_id"]: r["text"] for r in server.rows(
        "SELECT v.token_id, v.text FROM vocab v JOIN runs r ON r.weights_sha256 = v.weights_sha256 "
                "WHERE r.id = ? AND v.token_id IN (SELECT unnest(?))", prompt["run_id"], ids)}
    for r in layers:
        r["tokens"] = [texts.get(t) for t in r["token_ids"]]
    if not layers:
        raise HTTPException(404, f"No lens stored for prompt {prompt_id} at position {p}.")
    return {"prompt_id": prompt_id, "pos": p, "layers": layers}


@router.get("/neighbors", tags=["neighbors"])
def get_neighbors(request: Request, state_id: Annotated[int | None, Query(
                      ge=0, le=2**63 - 1, description="A stored state's id (`states.id`, also its FAISS id).")] = None,
                  prompt_id: Annotated[int | None, Query(ge=0, le=2**31 - 1, description=(
                      "With `layer`: the state of this prompt there, at `pos`."))] = None,
                  layer: Annotated[int | None, Query(ge=0, le=10_000, description=(
                      "A residual boundary, 0..L (0: the embedding output)."))] = None,
                  pos: Pos = None,
                  k: Annotated[int, Query(ge=1, le=200, description="Neighbours to return, at most 200.")] = 10,
                  last: Annotated[bool, Query(description="Search only each sequence's last position.")] = False
                  ) -> dict:
    """Nearest stored states (FAISS), by ``state_id`` or by ``prompt_id`` + ``layer`` (+ ``pos``)."""
    from geomap.store.query import neighbors

    server = server_of(request)
    if state_id is not None:
        found = _rows_of(server, lambda con: f"SELECT prompt_id, pos, layer FROM {relation(con)} WHERE id = ?",
                         state_id)
        if not found:
            raise HTTPException(404, f"No stored state with id {state_id}.")
        prompt_id, pos, layer = found[0]["prompt_id"], found[0]["pos"], found[0]["layer"]
    elif prompt_id is None or layer is None:
        raise HTTPException(422, "Invalid request: give state_id, or prompt_id and layer (and pos).")
    frame = neighbors(server.store, prompt_id, layer, pos, k, last_only=last)
    rows = [{c: json_value(v) for c, v in r.items()} for r in frame.to_dict(orient="records")]
    return {"prompt_id": prompt_id, "layer": layer, "pos": pos, "neighbors": rows}


# ---- SQL -----------------------------------------------------------------------------------------------------------

class SqlRequest(BaseModel):
    """One read-only statement; ``?`` or ``$name`` placeholders take ``params``."""

    model_config = ConfigDict(extra="forbid")
    sql: str = Field(min_length=1, max_length=100_000)
    params: list[Any] | dict[str, Any] | None = None
    time_limit: float = Field(default=5.0, gt=0, le=600, allow_inf_nan=False,
                              description="Seconds (capped by the server's limit).")
    max_rows: int = Field(default=1000, ge=1, le=1_000_000, description="Row cap (capped by the server's).")


class SqlResponse(BaseModel):
    """The rows (at most the cap), whether more matched, and the time taken."""

    columns: list[str]
    rows: list[list[Any]]
    truncated: bool
    elapsed_s: float
    time_limit: float
    max_rows: int


@router.post("/sql", response_model=SqlResponse, tags=["sql"],
             responses={200: {"content": {ARROW_STREAM: {}}, "description": "The rows as JSON, or as an Arrow IPC "
                                                                         "stream when Accept asks for one."}})
async def post_sql(request: Request, body: SqlRequest) -> Response:
    """Run read-only SQL in a READ ONLY transaction, locked down, with a time limit, a row cap and a memory budget.

    Many queries run at once, each on its own snapshot, on the server's pool of reader slots. With ``Accept:
    application/vnd.apache.arrow.stream`` the rows come as an Arrow IPC stream, and the other fields as
    ``x-geomap-*`` headers.
    """
    settings = server_of(request).settings
    limit, cap = min(body.time_limit, settings.sql_time_limit), min(body.max_rows, settings.sql_max_rows)
    arrow = wants_arrow(request.headers.get("accept"))
    return await run_in_threadpool(_sql_answer, server_of(request), body, limit, cap, arrow,  # the loop moves bytes
                                   arrived(request.scope))


def _sql_answer(server, body: SqlRequest, limit: float, cap: int, arrow: bool, since: float) -> Response:
    """Run the query and encode its answer, in a worker thread; its time limit counts from ``since``."""
    settings = server.settings
    result = run_sql(server.store, body.sql, body.params, time_limit=limit, max_rows=cap,
                     memory_mb=settings.sql_memory_mb, since=since)
    if arrow:
        return arrow_response(result.to_arrow(), {"x-geomap-truncated": str(result.truncated).lower(),
                                                  "x-geomap-elapsed-s": f"{result.elapsed_s:.6f}",
                                                  "x-geomap-time-limit": f"{limit:g}", "x-geomap-max-rows": str(cap)})
    out = {"columns": result.columns, "rows": result.json_rows(),
           "truncated": result.truncated, "elapsed_s": round(result.elapsed_s, 6), "time_limit": limit,
           "max_rows": cap}
    return Response(dumps(out), media_type="application/json")

"""Store commands: run, ingest, index (the read queries, sql and neighbors, are `geomap.cli.query_cmds`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from geomap.capture.config import PROFILES  # torch-free: `geomap.capture` loads its torch modules on first use

if TYPE_CHECKING:
    from geomap.store.handle import StoreLike


db_option = click.option("--db", "db", type=click.Path(dir_okay=False, path_type=Path), default=None,
                         help="DuckDB store (default: $GEOMAP_DB, else data/geomap.duckdb).")


def store_path(db: Path | None) -> Path:
    """The store a command works on: ``--db``, else the default (``$GEOMAP_DB``, else data/geomap.duckdb)."""
    from geomap.store.db import default_db_path

    return db or default_db_path()


def existing_store(db: Path | None) -> Path:
    """The store path, refused (before anything creates it) when there is no store there."""
    from geomap.store.db import NotFoundError

    path = store_path(db)
    if not path.is_file():
        raise NotFoundError(f"No store at {path}; create one with `geomap run` or `geomap ingest`, or give --db.")
    return path


def _check_writable(store: Path) -> None:
    """Fail fast, before a model loads, when another process holds the store's write lock."""
    from geomap.store.handle import Store

    if store.exists():
        Store.open(store, "w").close()


def prompt_keys_of(model, config, prompts) -> list[str]:
    """The content keys of ``prompts`` under ``config`` and ``model`` (a loaded model, or a name: its skeleton)."""
    from geomap.ingest.runs import model_identity
    from geomap.store.writer import prompt_key

    if isinstance(model, str):
        from geomap.models.skeleton import skeleton_model

        model = skeleton_model(model)
    identity, config_json = model_identity(model), config.to_json()
    return [prompt_key(identity, config_json, spec.text) for spec in prompts]


def report_summary(summary, as_json: bool, store: Path | None = None, keys: list[str] | None = None,
            loaded: bool = True) -> None:
    """Print a run's summary and, given the prompts' keys, which store id each of the user's prompts has."""
    from geomap.cli.prompt_ids import mapping_line, stored_prompts
    from geomap.ingest.summary import summary_json

    stored = stored_prompts(store, keys) if keys is not None else None
    if as_json:
        body = json.loads(summary_json(summary))
        body = body if loaded else {**body, "model_loaded": False}
        click.echo(json.dumps(body if stored is None else {**body, "prompts": stored}))
    else:
        if stored:
            click.echo(mapping_line(stored), err=True)
        _summary_line(summary)
    for line in summary.failures:
        click.echo(f"error: {line}", err=True)


def _summary_line(summary) -> None:
    if summary.run_id is None:
        click.echo(f"no prompts to store: all {summary.skipped} are stored already (no run recorded)", err=True)
    else:
        click.echo(f"run {summary.run_id}: stored {summary.stored} prompts ({summary.tokens} tokens), skipped "
                   f"{summary.skipped} already stored, {summary.failed} failed, in {summary.seconds:.1f}s", err=True)


def engine_options(command):
    """The ``--engine``, ``--address`` and ``--workers`` options (they override a pipeline's ``[engine]`` table)."""
    command = click.option("--workers", type=click.IntRange(min=1), default=None,
                           help="Ray: model replicas (default one per GPU, else one per two cores).")(command)
    command = click.option("--address", default=None,
                           help="Ray: join this cluster (e.g. 10.0.0.5:6379) instead of starting Ray locally.")(command)
    return click.option("--engine", "engine_kind", type=click.Choice(["inline", "ray"]), default=None,
                        help="inline (this process) or ray (Ray workers; pip install 'geomap[ray]').")(command)


def _ray_ingest(engine, store: Path, prompts, model: str, device: str | None, config, vector_dtype: str,
                batch_size: int, pipeline: str):
    """Run an ingestion on Ray with this process as the driver and the store's writer."""
    from geomap.ingest.ray_engine import ingest_ray, require_ray
    from geomap.ingest.runs import RunOptions

    require_ray()
    return ingest_ray(model, prompts, store, RunOptions(config, vector_dtype, batch_size, pipeline), engine, device)


def _server_engine(engine, device: str | None):
    """The engine to ask a server for: it runs Ray on its own machine, so no address or device comes from here."""
    from geomap.errors import GeomapError

    if engine.kind == "ray" and engine.address is not None:
        raise GeomapError("a running `geomap serve` owns this store and starts Ray on its own machine: --address "
                          "applies to a run without a server (stop the server, or drop --address)")
    if device is not None:
        raise GeomapError("a running `geomap serve` owns this store and chose its device when it started: drop "
                          "--device, or stop the server")
    return engine


@click.command()
@click.argument("pipeline_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@db_option
@click.option("--device", default=None, help="cpu, cuda, cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@click.option("--no-reports", is_flag=True, help="Skip the HTML reports the pipeline asks for.")
@click.option("--profile", type=click.Choice(PROFILES), default=None,
              help="Capture profile, overriding the pipeline's [capture] profile: 'full' keeps everything, 'states' "
                   "only the residual stream and the final readout.")
@engine_options
def run(pipeline_file: Path, db: Path | None, device: str | None, as_json: bool, no_reports: bool,
        profile: str | None, engine_kind: str | None, address: str | None, workers: int | None) -> None:
    """Run a pipeline TOML file: capture its prompts and store them (already stored prompts are skipped)."""
    import dataclasses

    from geomap.cli import quiet_transformers
    from geomap.cli.remote import server_for
    from geomap.ingest.pipeline import load_pipeline
    from geomap.ingest.validate import require_prompts

    pipe = load_pipeline(pipeline_file)
    if profile is not None:
        pipe = dataclasses.replace(pipe, capture=dataclasses.replace(pipe.capture, profile=profile))
    engine = pipe.engine.override(engine_kind, address, workers)
    prompts = pipe.prompts()
    require_prompts(prompts, f"{pipeline_file} (its sources {', '.join(str(p) for p, _, _ in pipe.sources)})")
    store = db or pipe.store
    client = server_for(store)
    if engine.kind == "ray" and client is None:
        _run_ray(engine, store, pipe, prompts, device, as_json, no_reports)
        return
    if client is not None:
        _run_on_server(client, store, pipe, prompts, engine, device, as_json, no_reports)
        return
    _check_writable(store)
    from geomap.cli.rerun import nothing_new

    if nothing_new(store, pipe, prompts, device, as_json, no_reports):
        return  # answered from the model's identity: neither torch nor transformers was imported
    quiet_transformers()
    from geomap.ingest.engine import ingest
    from geomap.models import load_model

    if sys.stderr.isatty():  # what the wait is for (a terminal only: error output stays one line)
        click.echo(f"loading {pipe.model} to capture what is not stored yet ...", err=True)
    loaded = load_model(pipe.model, device=device)
    summary = ingest(loaded, prompts, store, pipe.capture, pipe.vector_dtype, pipe.batch_size, pipeline=pipe.name)
    report_summary(summary, as_json, store, prompt_keys_of(loaded, pipe.capture, prompts))
    if pipe.continuation_tokens:
        _continue(store, pipe, prompts, loaded, as_json)
    if pipe.interventions:
        from geomap.cli.intervene_cmds import run_pipeline_interventions

        run_pipeline_interventions(store, pipe, loaded, no_reports)
    if pipe.reports and not no_reports:
        write_pipeline_reports(store, pipe, prompts, loaded)


def _run_ray(engine, store: Path, pipe, prompts, device: str | None, as_json: bool, no_reports: bool) -> None:
    """`run` on Ray: the workers capture, this process stores; then continuations, interventions and reports."""
    from geomap.cli import quiet_transformers

    quiet_transformers()
    summary = _ray_ingest(engine, store, prompts, pipe.model, device, pipe.capture, pipe.vector_dtype,
                          pipe.batch_size, pipe.name)
    report_summary(summary, as_json, store, prompt_keys_of(pipe.model, pipe.capture, prompts))
    loaded = None
    if pipe.continuation_tokens or pipe.interventions:  # the driver generates and builds the sweeps' specs
        from geomap.models import load_model

        loaded = load_model(pipe.model, device=device)
    if pipe.continuation_tokens:  # generation is one token at a time: the driver does it, as the inline run does
        _continue(store, pipe, prompts, loaded, as_json)
    if pipe.interventions:  # each sweep's batches go to Ray workers; the driver stores them
        from geomap.cli.intervene_cmds import run_pipeline_interventions

        run_pipeline_interventions(store, pipe, loaded, no_reports, engine)
    if pipe.reports and not no_reports:
        write_pipeline_reports(store, pipe, prompts, loaded)


def _run_on_server(client, store: Path, pipe, prompts, engine, device: str | None, as_json: bool,
                   no_reports: bool) -> None:
    """`run` through the server that owns the store: a job, then the reports it asks for, fetched from the server."""
    from geomap.cli.remote import fetch_report, run_job

    summary, view = run_job(client, prompts, pipe.model, pipe.capture, pipe.vector_dtype, pipe.batch_size,
                            pipe.name, engine=_server_engine(engine, device))
    report_summary(summary, as_json, store, prompt_keys_of(pipe.model, pipe.capture, prompts))
    if pipe.continuation_tokens:
        _missing_continuations(client, view)
    if pipe.reports and not no_reports:
        stored = view["progress"].get("prompts", [])
        pages = [f"journey-{pid}.html" for pid, _ in stored if not (pipe.reports / f"journey-{pid}.html").exists()]
        pages += [f"run-{run}.html" for run in sorted({run for _, run in stored})]
        for page in pages:
            fetch_report(client, page, pipe.reports / page)
        click.echo(f"reports: {len(pages)} written; open {pipe.reports / 'index.html'}", err=True)


def _missing_continuations(client, view: dict) -> None:
    """Say how many of the job's prompts have no stored continuation: a server job stores prompts, not those."""
    ids = [pid for pid, _ in view["progress"].get("prompts", [])]
    if not ids:
        return
    answer = client.request("POST", "/sql", {"sql": "SELECT count(DISTINCT parent_id) FROM prompt_kind WHERE kind = "
                                                    "'continuation' AND parent_id IN (SELECT unnest(?))",
                                             "params": [ids]})
    missing = len(ids) - int(answer["rows"][0][0])
    if missing > 0:
        click.echo(f"note: {missing} of the pipeline's prompts have no continuation (continuation_tokens) stored: "
                   "a server job stores prompts only. Stop the server and run `geomap run` again to add them (what "
                   "is stored is skipped).", err=True)


def _continue(store: StoreLike, pipe, prompts, loaded, as_json: bool) -> None:
    """Store the pipeline's greedy continuations after its prompts (the same step for every engine)."""
    from geomap.ingest.generation import continue_prompts

    continue_prompts(store, loaded, [spec.text for spec in prompts], pipe.continuation_tokens, pipe.capture,
                     pipe.vector_dtype, progress=not as_json, batch_size=pipe.batch_size)


def write_pipeline_reports(store: StoreLike, pipe, prompts, loaded) -> None:
    """Write the reports a pipeline asks for (``loaded`` None: the report stage loads the model if it needs it)."""
    from geomap.models.identity import identity_of
    from geomap.report.api import pipeline_reports
    from geomap.store.writer import prompt_key

    known = identity_of(pipe.model) if loaded is None else None  # from the model's files: no torch, no skeleton
    if known is not None:
        identity = known.key
    else:
        from geomap.ingest.runs import model_identity
        from geomap.models.skeleton import skeleton_model

        identity = model_identity(loaded or skeleton_model(pipe.model))
    keys = [prompt_key(identity, pipe.capture.to_json(), spec.text) for spec in prompts]
    from geomap.analysis.api import model_for

    written = pipeline_reports(store, keys, pipe.reports, loaded, load_model=model_for, workers=None)
    click.echo(f"reports: {written} written; open {pipe.reports / 'index.html'}", err=True)


def _capture_options(function):
    """The capture options of `ingest`: every capture setting a pipeline's [capture] table accepts."""
    options = [
        click.option("--attn-positions", default="last", show_default=True, metavar="last|all|I,J,...",
                     help="Query positions whose attention internals and MLP features are kept (negative: from "
                          "the end)."),
        click.option("--lens-positions", default="last", show_default=True, metavar="last|all|I,J,...",
                     help="Positions the logit lens reads."),
        click.option("--layers", default="all", show_default=True, metavar="all|I,J,...",
                     help="Residual boundaries 0..L the lens reads (and layers whose attention is kept)."),
        click.option("--top-k", default=50, show_default=True, type=click.IntRange(min=1),
                     help="Candidates kept per lens readout and per final distribution."),
        click.option("--mlp-top", default=32, show_default=True, type=click.IntRange(min=1),
                     help="MLP neurons kept per layer and position."),
        click.option("--overflow", default="error", show_default=True, type=click.Choice(["error", "truncate"]),
                     help="A prompt longer than the context window: store it as an error, or keep its last tokens. "
                          "With --max-tokens: refuse the batch, or keep each prompt's last N tokens."),
        click.option("--max-tokens", type=click.IntRange(min=2), default=None, metavar="N",
                     help="Token budget per prompt, BOS included (default: the context window)."),
        click.option("--attn-base", default="sdpa", show_default=True, type=click.Choice(["sdpa", "eager"]),
                     help="Attention kernel the capture delegates to."),
        click.option("--vector-dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]),
                     help="Storage of state vectors."),
        click.option("--profile", type=click.Choice(PROFILES), default="full", show_default=True,
                     help="'full' keeps everything; 'states' only the residual stream and the final readout."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@db_option
@click.option("--model", "model_name", default=None, help="Preset, local model directory or hub id.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Prompts per forward pass and per transaction.")
@_capture_options
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@engine_options
def ingest(files: tuple[Path, ...], db: Path | None, model_name: str | None, device: str | None, batch_size: int,
           as_json: bool, engine_kind: str | None, address: str | None, workers: int | None,
           **capture: str | int) -> None:
    """Ingest prompt files (txt, jsonl, csv, parquet) ad hoc; the capture options match a pipeline's [capture]."""
    from geomap.cli import quiet_transformers
    from geomap.ingest.engine import ingest as run_ingest
    from geomap.ingest.engine_config import EngineConfig
    from geomap.ingest.schema import capture_config, parse_layers, parse_positions
    from geomap.ingest.sources import read_source
    from geomap.ingest.validate import require_prompts
    from geomap.models import DEFAULT_MODEL, load_model

    engine = EngineConfig().override(engine_kind, address, workers)
    capture["attn_positions"] = parse_positions(capture["attn_positions"], "--attn-positions")
    capture["lens_positions"] = parse_positions(capture["lens_positions"], "--lens-positions")
    capture["layers"] = parse_layers(capture["layers"], "--layers")
    config, vector_dtype = capture_config(capture, "ingest options")
    prompts = [spec for path in files for spec in read_source(path)]
    require_prompts(prompts, ", ".join(map(str, files)))
    from geomap.cli.remote import run_job, server_for

    if (client := server_for(store_path(db))) is not None:
        report_summary(run_job(client, prompts, model_name or DEFAULT_MODEL, config, vector_dtype, batch_size, "ingest",
                        engine=_server_engine(engine, device))[0], as_json, store_path(db),
                prompt_keys_of(model_name or DEFAULT_MODEL, config, prompts))
        return
    if engine.kind == "ray":
        quiet_transformers()
        summary = _ray_ingest(engine, store_path(db), prompts, model_name or DEFAULT_MODEL, device, config,
                              vector_dtype, batch_size, "ingest")
        report_summary(summary, as_json, store_path(db), prompt_keys_of(model_name or DEFAULT_MODEL, config, prompts))
        return
    _check_writable(store_path(db))
    quiet_transformers()
    loaded = load_model(model_name or DEFAULT_MODEL, device=device)
    summary = run_ingest(loaded, prompts, store_path(db), config, vector_dtype, batch_size)
    report_summary(summary, as_json, store_path(db), prompt_keys_of(loaded, config, prompts))


@click.group()
def index() -> None:
    """Check or rebuild the FAISS indexes derived from the store."""


@index.command("rebuild")
@db_option
@click.option("--kind", default="auto", type=click.Choice(["auto", "flat", "ivf", "hnsw"]), show_default=True)
def index_rebuild(db: Path | None, kind: str) -> None:
    """Rebuild every state index from DuckDB (recomputing the standardisation)."""
    from geomap.store.handle import Store
    from geomap.store.vectors import build_state_indexes

    with Store.open(existing_store(db), "w") as store, store.writer() as con:
        rows = build_state_indexes(con, store.path, kind=kind)
    click.echo(f"rebuilt {len(rows)} indexes ({sum(r['ntotal'] for r in rows)} vectors)")


@index.command("verify")
@db_option
def index_verify(db: Path | None) -> None:
    """Check every index file against its manifest row and DuckDB."""
    from geomap.store.handle import Store
    from geomap.store.vectors import verify_indexes

    with Store.open(existing_store(db), "r") as store, store.snapshot() as con:
        problems = verify_indexes(con, store.path)
    for line in problems:
        click.echo(f"problem: {line}", err=True)
    if problems:
        sys.exit(2)
    click.echo("all indexes match their manifest and DuckDB")


COMMANDS = (run, ingest, index)

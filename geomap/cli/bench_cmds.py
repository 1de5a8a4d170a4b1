"""``geomap bench``: the benchmark harness."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click


@click.command()
@click.option("--quick", is_flag=True,
              help="Fewer prompts, rounds and sizes: about 20 minutes on 2 cores (the full run takes hours: its "
                   "memory figure stores 5,000 prompts).")
@click.option("--segments", "segments_states", type=click.IntRange(min=1000), default=None, metavar="STATES",
              help="Only the query bars of a large segments store instead: STATES states (1000000 for the bar) over "
                   "500+ segment files, written through the segment writer; trajectory SQL, kNN, journey report.")
@click.option("--json", "as_json", is_flag=True, help="Print {machine, figures: [{name, value, unit, target, met}]}.")
@click.option("--only", type=click.Choice(["interventions"]), default=None,
              help="One part alone: interventions (a causal-trace sweep against its bare forwards, and its storage "
                   "per intervention against a full journey).")
@click.option("--model", "model_name", default="gemma-3-270m", show_default=True)
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as a Markdown table (e.g. for docs/benchmarks.md).")
@click.option("--load", "load_", is_flag=True,
              help="The server under load instead: req/s and p50/p99 per query kind at 1, 4 and 16 clients, idle "
                   "and while a job ingests (a server of its own on 127.0.0.1).")
@click.option("--soak", type=click.FloatRange(min=0.1), default=None, metavar="MINUTES",
              help="With --load: mixed load plus repeated ingestion jobs for MINUTES; fails on errors, on resident "
                   "memory growth over 10% after warm-up, or on rows not stored exactly once.")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --load: the store to serve (default: one built of --prompts prompts in a temporary folder).")
@click.option("--prompts", "n_prompts", type=click.IntRange(min=1), default=300, show_default=True,
              help="With --load and no --db: prompts in the store it builds.")
@click.option("--reports", "reports_", is_flag=True,
              help="Report speed instead, on a stored demo (--db, default data/geomap.duckdb, built by `make run`): a "
                   "cold `geomap report journey`, the report part of `make run` (--pipeline), a served journey page "
                   "cold, beside `python -c pass`.")
@click.option("--pipeline", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("pipelines/journey.toml"), show_default=True, help="With --reports: the demo's pipeline.")
@click.option("--clients", default="1,4,16", show_default=True, help="With --load: client counts.")
@click.option("--seconds", type=click.FloatRange(min=1), default=20.0, show_default=True,
              help="With --load: seconds of each idle phase (a job phase lasts until its job ends, 60 s at least).")
@click.option("--rounds", type=click.IntRange(min=1, max=100), default=4, show_default=True,
              help="With --load: the idle phases run in this many interleaved rounds (each client count in turn, "
                   "--seconds / --rounds at a time), so a drift of the machine's speed falls on every count alike.")
def bench(quick: bool, segments_states: int | None, as_json: bool, only: str | None, model_name: str,
          markdown: Path | None, load_: bool, soak: float | None, db: Path | None, n_prompts: int, reports_: bool,
          pipeline: Path, clients: str, seconds: float, rounds: int) -> None:
    """Measure geomap beside the bare model, the peers and the machine (medians of interleaved rounds)."""
    if reports_:
        _reports(db or Path("data/geomap.duckdb"), pipeline, as_json, markdown, quick)
        return
    if load_ or soak is not None:
        _load(model_name, as_json, markdown, soak, db, n_prompts, clients, seconds, rounds)
        return
    from geomap.bench import run_bench, run_segment_bench
    from geomap.bench.core import as_json as to_json
    from geomap.bench.core import as_markdown, as_text
    from geomap.cli import quiet_transformers

    quiet_transformers()
    say = lambda line: click.echo(f"bench: {line}", err=True)  # noqa: E731
    if segments_states:
        info, figures, seconds = run_segment_bench(model_name, segments_states, say=say)
    else:
        info, figures, seconds = run_bench(model_name, quick, say=say, only=only)
    command = "geomap bench" + (" --quick" if quick else "") + (f" --segments {segments_states}" if segments_states
                                                                 else "") + (f" --only {only}" if only else "") + (
        "" if model_name == "gemma-3-270m" else f" --model {model_name}")
    if markdown:
        markdown.write_text(as_markdown(info, figures, command, seconds), encoding="utf-8")
    click.echo(json.dumps(to_json(info, figures, {"seconds": round(seconds, 1), "command": command}))
               if as_json else as_text(figures))
    missed = [f.name for f in figures if f.met is False]
    if missed:
        click.echo(f"{len(missed)} target(s) missed: {', '.join(missed)}", err=True)
    sys.exit(0)


def _reports(db: Path, pipeline: Path, as_json: bool, markdown: Path | None, quick: bool) -> None:
    from geomap.bench.core import as_json as to_json
    from geomap.bench.core import as_markdown, as_text, machine
    from geomap.bench.report_bench import report_figures

    if not db.exists():
        raise click.BadParameter(f"no store at {db}: `make run` builds the demo first.", param_hint="--db")
    if not pipeline.is_file():  # checked here, not by click: its default is relative to the repository's root
        raise click.BadParameter(f"no pipeline file at {pipeline}.", param_hint="--pipeline")
    start = time.perf_counter()
    figures = report_figures(db, pipeline, repeats=1 if quick else 3)
    command = f"geomap bench --reports --db {db} --pipeline {pipeline}" + (" --quick" if quick else "")
    if markdown:
        markdown.write_text(as_markdown(machine(), figures, command, time.perf_counter() - start), encoding="utf-8")
    click.echo(json.dumps(to_json(machine(), figures, {"command": command})) if as_json else as_text(figures))


def _load(model: str, as_json: bool, markdown: Path | None, soak: float | None, db: Path | None, n_prompts: int,
          clients: str, seconds: float, rounds: int) -> None:
    import tempfile

    from geomap.bench import load_bench, soak_bench
    from geomap.cli import quiet_transformers

    quiet_transformers()
    try:
        counts = tuple(int(c) for c in clients.split(","))
        if not counts or min(counts) < 1 or max(counts) > 64:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{clients!r}: give client counts from 1 to 64, e.g. 1,4,16.",
                                 param_hint="--clients") from None
    if db is not None and not db.exists():
        raise click.BadParameter(f"no store at {db}.", param_hint="--db")
    say = lambda line: click.echo(f"bench: {line}", err=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        store = db or load_bench.build_store(Path(tmp) / "load.duckdb", model, n_prompts, say)
        if soak is not None:
            report = soak_bench.run_soak(store, model, soak, say=say)
            click.echo(json.dumps(report) if as_json else json.dumps({k: v for k, v in report.items()
                                                                       if k != "rss_samples"}, indent=1))
            sys.exit(0 if report["ok"] else 1)
        phases = load_bench.run_load(store, model, counts, seconds, say=say, rounds=rounds)
    table = load_bench.as_markdown(phases)
    if markdown:
        markdown.write_text(table + "\n", encoding="utf-8")
    click.echo(json.dumps([p.row() for p in phases]) if as_json else table)


COMMANDS = [bench]

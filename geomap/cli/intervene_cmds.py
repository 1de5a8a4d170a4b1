"""``geomap intervene patch|ablate|steer|trace``: sweeps of interventions, stored beside the clean journeys."""

from __future__ import annotations

import json
from pathlib import Path

import click

from geomap.cli.store_cmds import db_option, engine_options, store_path


def _common(fn):
    fn = engine_options(fn)
    for option in reversed([
        click.argument("prompt"),
        db_option,
        click.option("--model", "model_name", default=None, help="Preset, local model directory or hub id."),
        click.option("--layer", "layers", default="all", show_default=True,
                     help="Layers: all, N, a list (2,5) or a range (2:6); residual boundaries for --site resid."),
        click.option("--pos", "positions", default="all", show_default=True,
                     help="Positions in PROMPT (negative from the end): all, N, a list or a range."),
        click.option("--site", default="resid", show_default=True,
                     type=click.Choice(["resid", "attn", "mlp", "head"])),
        click.option("--head", "heads", default=None, help="Heads for --site head: all, N, a list or a range."),
        click.option("--target", "targets", multiple=True,
                     help="Target token for the effects table (one token; repeatable). Default: the clean top-1."),
        click.option("--name", default=None, help="The sweep's name (default: the operation and the prompt)."),
        click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 4096),
                     help="Interventions per forward pass."),
        click.option("--json", "as_json", is_flag=True, help="Print the effects as JSON lines."),
    ]):
        fn = option(fn)
    return fn


def _run(data: dict, db: Path | None, model_name: str | None, batch_size: int, as_json: bool,
         engine: tuple = (None, None, None)) -> None:
    """Validate a sweep's options (as a pipeline's [[interventions]] entry), run it, print its effects.

    ``engine`` is the ``--engine``, ``--address`` and ``--workers`` flags: ``--engine ray`` spreads the sweep's
    batches over Ray workers.
    """
    from geomap.ingest.engine_config import EngineConfig
    from geomap.ingest.intervention_plan import run_plan, validate_plan

    plan = validate_plan({k: v for k, v in data.items() if v is not None}, "geomap intervene")
    config = EngineConfig().override(*engine)
    if config.kind == "ray":
        from geomap.ingest.ray_engine import require_ray

        require_ray()
    loaded = _load(model_name)
    summary = run_plan(loaded, plan, store_path(db), batch_size, engine=config)
    _print(store_path(db), plan.sweep_name(), summary, as_json)


def _print(db: Path, name: str, summary, as_json: bool) -> None:
    from geomap.analysis.interventions import effects

    frame = effects(db, name)
    frame = frame[frame.intervention_id.isin(summary.ids)]
    if as_json:
        for row in frame.to_dict(orient="records"):
            click.echo(json.dumps({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()},
                                  ensure_ascii=False, default=str))
        return
    click.echo(f"sweep {name!r}: {summary.stored} interventions stored, {summary.skipped} already stored "
               f"({summary.seconds:.1f} s)")
    for row in frame.to_dict(orient="records"):
        head, flip = _given(row["head"]), _given(row["first_flip_layer"])
        where = f"{row['site']}{'' if head is None else f'.h{int(head)}'} L{row['layer']} pos {list(row['positions'])}"
        extra = f" α={row['coefficient']:g}" if row["operation"] == "steer" else ""
        flip_text = "" if flip is None else f", lens top-1 differs from layer {int(flip)}"
        click.echo(f"#{row['intervention_id']} {where}{extra}: {row['token']!r} p={row['prob']:.4f} "
                   f"({row['prob_change']:+.4f}) rank {row['rank']} KL {row['kl']:.4f}{flip_text}")


def _given(value):
    """None for a missing value (None, NaN, pandas NA), else the value."""
    import pandas as pd

    return None if value is None or pd.isna(value) else value


def _load(model_name):
    from geomap.cli import quiet_transformers
    from geomap.models import DEFAULT_MODEL, load_model

    quiet_transformers()
    return load_model(model_name or DEFAULT_MODEL)


@click.group()
def intervene() -> None:
    """Patch, ablate, steer or trace a prompt's run; store the counterfactual journeys and their effects."""


def _selection(value: str | None, what: str):
    """An option's 'all' / N / list / range as the plan's "all" or list (ranges need the model: kept as text)."""
    if value is None:
        return None
    text = value.strip()
    if text == "all":
        return "all"
    if ":" in text:
        return text
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        from geomap.intervene import InterventionError

        raise InterventionError(f"{what} {value!r} is not 'all', a number, a list (2,5) or a range (2:6)") from None


def _options(prompt, layers, positions, site, heads, targets, name) -> dict:
    return {"prompt": prompt, "layers": _selection(layers, "--layer"), "positions": _selection(positions, "--pos"),
            "site": site, "heads": _selection(heads, "--head"), "targets": list(targets) or None, "name": name}


@intervene.command()
@_common
@click.option("--source", required=True, help="The prompt whose activations are copied in.")
def patch(prompt, db, model_name, layers, positions, site, heads, targets, name, batch_size, as_json, engine_kind,
          address, workers, source):
    """Copy a site from SOURCE's run into PROMPT's run, at every chosen layer × position (aligned from the end)."""
    _run({"operation": "patch", **_options(prompt, layers, positions, site, heads, targets, name), "source": source},
         db, model_name, batch_size, as_json, (engine_kind, address, workers))


@intervene.command()
@_common
@click.option("--how", type=click.Choice(["zero", "mean", "resample"]), default="zero", show_default=True)
@click.option("--source", default=None, help="resample: the prompt whose activations replace PROMPT's.")
@click.option("--mean-tag", default=None, help="mean: the tag of the stored prompts the mean is taken over.")
def ablate(prompt, db, model_name, layers, positions, site, heads, targets, name, batch_size, as_json, engine_kind,
           address, workers, how, source, mean_tag):
    """Zero a site, set it to its mean over a stored prompt set, or resample it from another prompt."""
    _run({"operation": "ablate", **_options(prompt, layers, positions, site, heads, targets, name), "ablation": how,
          "source": source, "mean_tag": mean_tag}, db, model_name, batch_size, as_json,
         (engine_kind, address, workers))


@intervene.command()
@_common
@click.option("--alpha", "alphas", default="0,1,2,4,8", show_default=True, help="Comma-separated coefficients.")
@click.option("--tokens", nargs=2, default=None, help="Direction u(A) − u(B) from two unembedding rows.")
@click.option("--tags", nargs=2, default=None,
              help="Direction: mean stored state of prompts tagged A minus tagged B (at --layer, last position).")
@click.option("--state", "state_id", type=int, default=None, help="Direction: one stored state (states.id).")
def steer(prompt, db, model_name, layers, positions, site, heads, targets, name, batch_size, as_json, engine_kind,
          address, workers, alphas, tokens, tags, state_id):
    """Add α·direction at a layer and positions, over a sweep of α."""
    from geomap.intervene import InterventionError

    try:
        coefficients = [float(a) for a in alphas.split(",") if a.strip()]
    except ValueError:
        raise InterventionError(f"--alpha {alphas!r} is not a comma-separated list of numbers") from None
    _run({"operation": "steer", **_options(prompt, layers, positions, site, heads, targets, name),
          "alphas": coefficients, "direction_tokens": list(tokens) if tokens else None,
          "direction_tags": list(tags) if tags else None, "direction_state": state_id},
         db, model_name, batch_size, as_json, (engine_kind, address, workers))


@intervene.command()
@_common
@click.option("--corrupt", default=None, help="Corrupt with this second prompt (same length) instead of noise.")
@click.option("--subject", default=None, help="Noise on the tokens of this part of PROMPT (its last occurrence).")
@click.option("--noise", "noise_scale", default=3.0, show_default=True, help="Noise scale × the embedding std.")
@click.option("--seed", default=0, show_default=True)
@click.option("--window", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Restore a window of layers around each layer (attn and mlp sites).")
def trace(prompt, db, model_name, layers, positions, site, heads, targets, name, batch_size, as_json, engine_kind,
          address, workers, corrupt, subject, noise_scale, seed, window):
    """Causal trace: restore every (layer, position) of PROMPT's clean run into a corrupted run."""
    _run({"operation": "trace", **_options(prompt, layers, positions, site, heads, targets, name),
          "corrupt": corrupt, "subject": subject, "noise": noise_scale, "seed": seed, "window": window},
         db, model_name, batch_size, as_json, (engine_kind, address, workers))


@intervene.command("report")
@db_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"), show_default=True)
@click.option("--sweep", "names", multiple=True, help="Only this sweep (repeatable); default: every sweep.")
@click.option("--single-file", is_flag=True, help="Inline the CSS and script into each page.")
def report(db, out, names, single_file):
    """Write each sweep's page (heatmap or steering chart) and every intervened journey beside its clean one."""
    from geomap.report.intervention_view import intervention_reports
    from geomap.store.owned import refuse_store_file

    refuse_store_file(store_path(db), out)
    written = intervention_reports(store_path(db), out, list(names) or None, single_file)
    click.echo(f"{len(written)} pages written; open {out / 'index.html'}")


def run_pipeline_interventions(store: Path, pipe, loaded, no_reports: bool = False, engine=None) -> None:
    """Run a pipeline's ``[[interventions]]`` sweeps (after its prompts) and their report pages.

    ``engine``: the run's engine (its ``[engine]`` table with the command line's flags); Ray spreads each sweep's
    batches over its workers.
    """
    from geomap.ingest.intervention_plan import run_plan

    for plan in pipe.interventions:
        summary = run_plan(loaded, plan, store, pipe.batch_size, config=pipe.capture, engine=engine)
        click.echo(f"interventions {plan.sweep_name()!r}: {summary.stored} stored, {summary.skipped} already stored",
                   err=True)
    if pipe.reports and not no_reports:
        from geomap.report.intervention_view import intervention_reports

        names = [plan.sweep_name() for plan in pipe.interventions]
        written = intervention_reports(store, pipe.reports, names)
        click.echo(f"interventions: {len(written)} report pages in {pipe.reports}", err=True)


COMMANDS = [intervene]

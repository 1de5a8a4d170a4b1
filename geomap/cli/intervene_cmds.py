"""``geomap intervene patch|ablate|steer|trace``: sweeps of interventions, stored beside the clean journeys."""

from __future__ import annotations

import json
from pathlib import Path

import click

from geomap.cli.store_cmds import _db, db_option


def parse_range(value: str, top: int, what: str) -> list[int]:
    """``all``, ``3``, ``-1``, ``2,5,7`` or ``2:6`` (end exclusive) → ints; ``top`` is the count of valid values."""
    from geomap.intervene.hooks import InterventionError

    text = value.strip()
    if text == "all":
        return list(range(top))
    try:
        if ":" in text:
            lo, _, hi = text.partition(":")
            return list(range(int(lo or 0), int(hi) if hi else top))
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InterventionError(f"{what} {value!r} is not 'all', a number, a list (2,5) or a range (2:6)") from None


def _common(fn):
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


def _cells(loaded, prompt: str, layers: str, positions: str, site: str, heads: str | None):
    """(Site, position) cells of a sweep: every layer × position (× head)."""
    from geomap.capture.tokens import encode
    from geomap.intervene import Site

    a = loaded.anatomy
    n = len(encode(loaded.tokenizer, prompt, a.context_window, "error").ids)
    top = a.n_layers + 1 if site == "resid" else a.n_layers
    layer_list = parse_range(layers, top, "--layer")
    pos_list = [p - n if p >= 0 else p for p in parse_range(positions, n, "--pos")]
    head_list = parse_range(heads or "all", a.n_heads, "--head") if site == "head" else [None]
    return [(Site(site, layer, head), pos) for layer in layer_list for head in head_list for pos in pos_list]


def _finish(loaded, specs, db, targets, name, batch_size, as_json) -> None:
    from geomap.analysis.interventions import effects
    from geomap.ingest.interventions import sweep

    summary = sweep(loaded, specs, _db(db), targets, name=name, batch_size=batch_size)
    frame = effects(_db(db), name)
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
    from geomap.cli import _quiet_transformers
    from geomap.models import DEFAULT_MODEL, load_model

    _quiet_transformers()
    return load_model(model_name or DEFAULT_MODEL)


@click.group()
def intervene() -> None:
    """Patch, ablate, steer or trace a prompt's run; store the counterfactual journeys and their effects."""


@intervene.command()
@_common
@click.option("--source", required=True, help="The prompt whose activations are copied in.")
def patch(prompt, db, model_name, layers, positions, site, heads, targets, name, batch_size, as_json, source):
    """Copy a site from SOURCE's run into PROMPT's run, at every chosen layer × position (aligned from the end)."""
    from geomap.intervene import Spec

    loaded = _load(model_name)
    specs = [Spec("patch", prompt, s, (p,), source=source)
             for s, p in _cells(loaded, prompt, layers, positions, site, heads)]
    _finish(loaded, specs, db, targets, name or f"patch: {prompt}", batch_size, as_json)


@intervene.command()
@_common
@click.option("--how", type=click.Choice(["zero", "mean", "resample"]), default="zero", show_default=True)
@click.option("--source", default=None, help="resample: the prompt whose activations replace PROMPT's.")
@click.option("--mean-tag", default=None, help="mean: the tag of the stored prompts the mean is taken over.")
def ablate(prompt, db, model_name, layers, positions, site, heads, targets, name, batch_size, as_json, how, source,
           mean_tag):
    """Zero a site, set it to its mean over a stored prompt set, or resample it from another prompt."""
    from geomap.intervene import InterventionError, Spec
    from geomap.intervene.directions import site_mean
    from geomap.intervene.spec import vector_bytes

    loaded = _load(model_name)
    if how == "resample" and not source:
        raise InterventionError("--how resample needs --source")
    if how == "mean" and not mean_tag:
        raise InterventionError("--how mean needs --mean-tag")
    texts = _tagged_texts(_db(db), mean_tag) if how == "mean" else []
    specs = []
    for s, p in _cells(loaded, prompt, layers, positions, site, heads):
        vector = vector_bytes(site_mean(loaded, texts, s)) if how == "mean" else None
        specs.append(Spec("ablate", prompt, s, (p,), ablation=how, source=source if how == "resample" else None,
                          vector=vector, vector_label=f"mean of tag {mean_tag}" if vector else None))
    _finish(loaded, specs, db, targets, name or f"ablate {how}: {prompt}", batch_size, as_json)


def _tagged_texts(db: Path, tag: str) -> list[str]:
    from geomap.intervene import InterventionError
    from geomap.store.db import connect

    con = connect(db, read_only=True)
    try:
        rows = con.execute("SELECT DISTINCT text FROM prompts WHERE list_contains(tags, ?) AND status = 'done' "
                           "AND parent_id IS NULL ORDER BY text", [tag]).fetchall()
    finally:
        con.close()
    if not rows:
        raise InterventionError(f"no stored prompt is tagged {tag!r}")
    return [r[0] for r in rows]


@intervene.command()
@_common
@click.option("--alpha", "alphas", default="0,1,2,4,8", show_default=True, help="Comma-separated coefficients.")
@click.option("--tokens", nargs=2, default=None, help="Direction u(A) − u(B) from two unembedding rows.")
@click.option("--tags", nargs=2, default=None,
              help="Direction: mean stored state of prompts tagged A minus tagged B (at --layer, last position).")
@click.option("--state", "state_id", type=int, default=None, help="Direction: one stored state (states.id).")
def steer(prompt, db, model_name, layers, positions, site, heads, targets, name, batch_size, as_json, alphas, tokens,
          tags, state_id):
    """Add α·direction at a layer and positions, over a sweep of α."""
    from geomap.analysis.interventions import stored_state, tagged_mean_state
    from geomap.intervene import InterventionError, Spec
    from geomap.intervene.directions import unembed_direction
    from geomap.intervene.spec import vector_bytes

    if sum(x is not None for x in (tokens, tags, state_id)) != 1:
        raise InterventionError("give one direction: --tokens A B, --tags A B or --state ID")
    try:
        coefficients = [float(a) for a in alphas.split(",") if a.strip()]
    except ValueError:
        raise InterventionError(f"--alpha {alphas!r} is not a comma-separated list of numbers") from None
    loaded = _load(model_name)
    cells = _cells(loaded, prompt, layers, positions, site, heads)
    layer_set = sorted({s.layer for s, _ in cells})
    by_layer = {}
    for layer in layer_set:
        if tokens:
            by_layer[layer] = (unembed_direction(loaded, *tokens), f"u({tokens[0]!r}) - u({tokens[1]!r})")
        elif tags:
            vec = tagged_mean_state(_db(db), tags[0], layer) - tagged_mean_state(_db(db), tags[1], layer)
            by_layer[layer] = (vec, f"mean[{tags[0]}] - mean[{tags[1]}] at layer {layer}")
        else:
            by_layer[layer] = (stored_state(_db(db), state_id), f"state {state_id}")
    pos = tuple(sorted({p for _, p in cells}))
    specs = [Spec("steer", prompt, s, pos, vector=vector_bytes(by_layer[s.layer][0]),
                  vector_label=by_layer[s.layer][1], coefficient=c)
             for s in dict.fromkeys(s for s, _ in cells) for c in coefficients]
    _finish(loaded, specs, db, targets, name or f"steer: {prompt}", batch_size, as_json)


@intervene.command()
@_common
@click.option("--corrupt", default=None, help="Corrupt with this second prompt (same length) instead of noise.")
@click.option("--subject", default=None, help="Noise on the tokens of this part of PROMPT (its last occurrence).")
@click.option("--noise", "noise_scale", default=3.0, show_default=True, help="Noise scale × the embedding std.")
@click.option("--seed", default=0, show_default=True)
@click.option("--window", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Restore a window of layers around each layer (attn and mlp sites).")
def trace(prompt, db, model_name, layers, positions, site, heads, targets, name, batch_size, as_json, corrupt,
          subject, noise_scale, seed, window):
    """Causal trace: restore every (layer, position) of PROMPT's clean run into a corrupted run."""
    from geomap.intervene import InterventionError, Noise, Spec

    if (corrupt is None) == (subject is None):
        raise InterventionError("give --corrupt TEXT or --subject TEXT (noise on the subject), not both")
    loaded = _load(model_name)
    cells = _cells(loaded, prompt, layers, positions, site, heads)
    if corrupt is not None:
        specs = [Spec("trace", corrupt, s, (p,), source=prompt, window=window) for s, p in cells]
    else:
        noisy = subject_positions(loaded, prompt, subject)
        specs = [Spec("trace", prompt, s, (p,), noise=Noise(noisy, noise_scale, seed), window=window)
                 for s, p in cells]
    _finish(loaded, specs, db, targets, name or f"trace: {prompt}", batch_size, as_json)


def subject_positions(loaded, prompt: str, subject: str) -> tuple[int, ...]:
    """Token positions of PROMPT covering the last occurrence of ``subject`` (by character offsets)."""
    from geomap.intervene import InterventionError

    start = prompt.rfind(subject)
    if not subject or start < 0:
        raise InterventionError(f"subject {subject!r} is not in the prompt")
    end = start + len(subject)
    enc = loaded.tokenizer(prompt, return_offsets_mapping=True)
    out = tuple(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start)
    if not out:
        raise InterventionError(f"subject {subject!r} covers no token of the prompt")
    return out


COMMANDS = [intervene]

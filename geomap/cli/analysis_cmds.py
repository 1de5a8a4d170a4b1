"""Analysis commands: decode, generate, geometry, attribute, project, position, stats, tuned-lens."""

from __future__ import annotations

import json
from pathlib import Path

import click

from geomap.cli.prompt_ids import prompt_option
from geomap.cli.store_cmds import db_option, store_path

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")

def strategy_options(fn):
    """The decoding options shared by `decode` and `generate` (none given: greedy)."""
    for option in reversed([
        click.option("--temperature", type=float, default=None, help="Divide logits by T (> 0)."),
        click.option("--top-k", type=int, default=None, help="Keep the K highest logits."),
        click.option("--top-p", type=float, default=None, help="Nucleus: keep the smallest set with mass ≥ P."),
        click.option("--min-p", type=float, default=None, help="Keep tokens with prob ≥ M × the top prob."),
        click.option("--seed", type=int, default=None, help="Seed of the sampling draw (default 0)."),
    ]):
        fn = option(fn)
    return fn


def make_strategy(temperature, top_k, top_p, min_p, seed):
    """The `Strategy` the decoding options describe."""
    from geomap.analysis.decoding import Strategy

    return Strategy(temperature=1.0 if temperature is None else temperature, top_k=top_k, top_p=top_p,
                    min_p=min_p, seed=seed)


def _show(token: str | None) -> str:
    return repr(token) if token is not None else "?"


@click.command()
@prompt_option()
@click.option("--pos", type=int, default=None, help="Position (default: the prompt's last).")
@strategy_options
@db_option
@json_option
def decode(prompt_id: int, pos: int | None, temperature, top_k, top_p, min_p, seed, db: Path | None,
           as_json: bool) -> None:
    """Decide the next token from stored logits (no model rerun); the decision is stored in `decisions`."""
    from geomap.analysis.api import decode as run

    frame = run(store_path(db), prompt_id, make_strategy(temperature, top_k, top_p, min_p, seed), pos)
    a = frame.attrs
    if as_json:
        click.echo(json.dumps({"prompt_id": a["prompt_id"], "pos": a["pos"], **a["strategy"], "exact": a["exact"],
                               "cut_mass": a["cut_mass"], "tail_mass": a["tail_mass"],
                               "kept": frame.to_dict(orient="records"), "chosen": a["chosen"],
                               "decision_id": a["decision_id"]}, ensure_ascii=False))
        return
    s, c = a["strategy"], a["chosen"]
    params = ", ".join(f"{k}={v}" for k, v in s.items() if k != "strategy" and v is not None)
    click.echo(f"prompt {a['prompt_id']}, position {a['pos']}: {s['strategy']}" + (f" ({params})" if params else ""))
    mass = "unknown" if a["cut_mass"] is None else f"{a['cut_mass']:.4f}"
    click.echo(f"kept {len(frame)} candidate(s), mass at the cut {mass}; "
               + ("exact" if a["exact"] else f"approximate (tail mass {a['tail_mass']:.4f} not stored)"))
    for row in frame.head(10).itertuples():
        click.echo(f"  {row.id:>7}  {_show(row.token):<20} {row.prob:.4f}")
    if len(frame) > 10:
        click.echo(f"  ... {len(frame) - 10} more")
    click.echo(f"chosen: {_show(c['token'])} (id {c['id']}, rank {c['rank']}, p={c['prob']:.4f}) · decision "
               f"{a['decision_id']}")


@click.command()
@click.argument("text")
@click.option("--max-new-tokens", type=int, default=8, show_default=True)
@strategy_options
@click.option("--model", "model_name", default=None, help="Preset, local model directory or hub id.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N.")
@db_option
@json_option
def generate(text: str, max_new_tokens: int, temperature, top_k, top_p, min_p, seed, model_name, device,
             db: Path | None, as_json: bool) -> None:
    """Generate after TEXT, storing the generation (linked to TEXT's prompt row) and each step's decision."""
    from geomap.cli import quiet_transformers
    from geomap.ingest.generation import generate as run
    from geomap.models import load_model

    strategy = make_strategy(temperature, top_k, top_p, min_p, seed)
    quiet_transformers()
    loaded = load_model(model_name, device=device)
    frame = run(store_path(db), loaded, text, max_new_tokens, strategy)
    a = frame.attrs
    if as_json:
        click.echo(json.dumps({"prompt_id": a["prompt_id"], "parent_id": a["parent_id"], "text": a["text"],
                               "stopped": a["stopped"], **a["strategy"],
                               "generated": frame.to_dict(orient="records"), "decision_ids": a["decision_ids"]},
                              ensure_ascii=False))
        return
    click.echo(f"{a['text']!r}")
    click.echo(f"generation stored as prompt {a['prompt_id']} (parent {a['parent_id']}), "
               f"{a['strategy']['strategy']}, stopped at {a['stopped']}")
    for step, row in enumerate(frame.itertuples()):
        click.echo(f"  step {step}: {_show(row.token):<20} id {row.id:>7}  p={row.prob:.4f}")


@click.command()
@prompt_option()
@click.option("--layer", type=int, default=None, help="Residual boundary 0..L (default: L, the final layer).")
@click.option("--pos", type=int, default=None, help="Position (default: the prompt's last).")
@click.option("--contrast", multiple=True, help="A token to compare, e.g. ' banana' (repeatable).")
@click.option("-k", "k", default=10, show_default=True, help="Candidates and neighbours to show.")
@db_option
@json_option
def geometry(prompt_id: int, layer: int | None, pos: int | None, contrast: tuple[str, ...], k: int,
             db: Path | None, as_json: bool) -> None:
    """How a stored state lines up with the unembedding vectors: dots, cosines, the top-1 vs top-2 margin."""
    from geomap.analysis.api import geometry as run
    from geomap.cli import quiet_transformers

    quiet_transformers()
    frame = run(store_path(db), prompt_id, layer, pos, contrast, k)
    a = frame.attrs

    def block(role, score="dot"):
        rows = frame[frame.role == role]
        return [{"id": int(r.id), "token": r.token, **({"score": float(r.dot)} if score == "score" else
                                                        {"dot": float(r.dot), "cosine": float(r.cosine)})}
                for r in rows.itertuples()]

    if as_json:
        click.echo(json.dumps({"prompt_id": prompt_id, "layer": a["layer"], "pos": a["pos"],
                               "candidates": block("candidate"), "contrast": block("contrast"),
                               "margin": a["margin"], "direction_dot": a["direction_dot"],
                               "bias_diff": a["bias_diff"], "top1": a["top1"], "top2": a["top2"],
                               "normed_norm": a["normed_norm"], "nearest": block("nearest", "score"),
                               "embedding": block("embedding")}, ensure_ascii=False))
        return
    click.echo(f"prompt {prompt_id}, layer {a['layer']}, position {a['pos']}: |h̃| = {a['normed_norm']:.2f} "
               "(the state after the final norm)")
    for role, title in (("candidate", "top candidates (u·h̃ is the logit without bias)"),
                        ("contrast", "contrast tokens"), ("nearest", "nearest unembedding directions (FAISS)"),
                        ("embedding", "nearest input-embedding rows (cosine with the raw state)")):
        rows = frame[frame.role == role]
        if len(rows):
            click.echo(f"{title}:")
            for r in rows.itertuples():
                click.echo(f"  {r.rank:>2}. {_show(r.token):<20} dot {r.dot:>9.3f}  cos {r.cosine:.4f}")
    click.echo(f"margin {_show(a['top1']['token'])} − {_show(a['top2']['token'])}: {a['margin']:.4f} = "
               f"(u1 − u2)·h̃ {a['direction_dot']:.4f} + bias {a['bias_diff']:.4f}")


@click.command()
@prompt_option()
@click.option("--token", default=None, help="Token text to attribute, e.g. ' coming' (default: the top-1).")
@click.option("--pos", type=int, default=None, help="Position (default: the prompt's last).")
@click.option("--top", default=5, show_default=True, help="Promoting and suppressing parts to show.")
@db_option
@json_option
def attribute(prompt_id: int, token: str | None, pos: int | None, top: int, db: Path | None, as_json: bool) -> None:
    """Direct logit attribution: a token's logit as the sum of the embedding, each attention (and head), each MLP."""
    from geomap.analysis.api import attribute as run
    from geomap.cli import quiet_transformers

    quiet_transformers()
    frame = run(store_path(db), prompt_id, token, pos)
    a = frame.attrs

    def parts(rows):
        return [{"level": r.level, "component": r.component, "layer": None if r.layer != r.layer else int(r.layer),
                 "head": None if r.head != r.head else int(r.head), "value": float(r.value)}
                for r in rows.itertuples()]

    fine = frame[(frame.level == "head") | ~frame.component.isin(["attn"] if (frame.level == "head").any() else [])]
    ranked = fine.sort_values("value")
    if as_json:
        click.echo(json.dumps({"prompt_id": prompt_id, "pos": a["pos"], "token": a["token"]["token"],
                               "token_id": a["token"]["id"], "logit": a["logit"], "model_logit": a["model_logit"],
                               "parts": parts(frame), "promoting": parts(ranked[::-1].head(top)),
                               "suppressing": parts(ranked.head(top))}, ensure_ascii=False))
        return
    layer_sum = frame[frame.level == "layer"].value.sum()
    click.echo(f"prompt {prompt_id}, position {a['pos']}: logit of {_show(a['token']['token'])} = {a['logit']:.4f} "
               f"(the model's: {a['model_logit'] if a['model_logit'] is None else round(a['model_logit'], 4)}); "
               f"the parts sum to {layer_sum:.4f}")
    by = frame[frame.level == "layer"]
    emb = by[by.component == "embed"].value.sum()
    click.echo(f"  embedding {emb:+.3f}   biases {by[by.component == 'bias'].value.sum():+.3f}")
    click.echo("  layer      attn       mlp")
    for layer in sorted({int(x) for x in by.layer.dropna()}):
        at = by[(by.component == "attn") & (by.layer == layer)].value.sum()
        ml = by[(by.component == "mlp") & (by.layer == layer)].value.sum()
        click.echo(f"  {layer:>5}  {at:+8.3f}  {ml:+8.3f}")

    def name(r):
        if r.component == "head":
            return f"L{int(r.layer)} head {int(r.head)}"
        return r.component if r.layer != r.layer else f"L{int(r.layer)} {r.component}"

    for title, rows in (("most promoting:  ", ranked[::-1].head(top)), ("most suppressing:", ranked.head(top))):
        click.echo(f"{title} " + ", ".join(f"{name(r)} {r.value:+.3f}" for r in rows.itertuples()))


@click.command()
@click.option("--run", "run_id", type=int, required=True, help="Stored run id (see `SELECT * FROM runs`).")
@click.option("--method", default="pca", show_default=True, type=click.Choice(["pca", "umap", "tsne"]))
@click.option("--layers", default=None, help="Comma-separated boundaries (default: all).")
@click.option("--per-layer", is_flag=True, help="One fit per layer instead of one basis across layers.")
@click.option("--seed", default=0, show_default=True)
@db_option
@json_option
def project(run_id: int, method: str, layers: str | None, per_layer: bool, seed: int, db: Path | None,
            as_json: bool) -> None:
    """Fit 2-D maps (PCA, UMAP, t-SNE) of a run's states after the final norm; stored in `projections`."""
    from geomap.analysis.maps import project as run
    from geomap.cli import quiet_transformers

    chosen = None if layers is None else [int(v) for v in layers.split(",") if v.strip()]
    quiet_transformers()
    frame = run(store_path(db), run_id, method, chosen, joint=not per_layer, seed=seed)
    a = frame.attrs
    if as_json:
        click.echo(json.dumps({"run_id": run_id, "method": method, "joint": a["joint"], "layers": a["layers"],
                               "tokens": a["tokens"], "projections": frame.to_dict(orient="records")}))
        return
    for row in frame.itertuples():
        where = "all layers (one basis)" if row.layer is None or row.layer != row.layer else f"layer {int(row.layer)}"
        explained = "" if row.explained is None else " · explained " + ", ".join(f"{v:.3f}" for v in row.explained)
        click.echo(f"projection {row.projection_id}: {method} of {row.n_points} states, {where}{explained}")
    ids = ", ".join(str(v) for v in frame["projection_id"])
    click.echo(f"points: SELECT * FROM projection_points WHERE projection_id IN ({ids})")


@click.command()
@prompt_option()
@click.option("--layer", type=int, default=None, help="Decoder layer (default: every layer with stored attention).")
@click.option("--head", type=int, default=None, help="Head (default: all).")
@click.option("--key-pos", type=int, default=None, help="Key position (default: the one each head attends most).")
@click.option("--max-distance", default=64, show_default=True)
@db_option
@json_option
def position(prompt_id: int, layer: int | None, head: int | None, key_pos: int | None, max_distance: int,
             db: Path | None, as_json: bool) -> None:
    """How position enters: RoPE angles and q·k by distance (or learned position vectors); stored."""
    from geomap.analysis.positions_api import position as run
    from geomap.cli import quiet_transformers

    quiet_transformers()
    frame = run(store_path(db), prompt_id, layer, head, key_pos, max_distance)
    a = frame.attrs
    if as_json:
        click.echo(json.dumps({**a, "rows": json.loads(frame.to_json(orient="records"))}))
        return
    if a["kind"] == "learned":
        click.echo(f"learned absolute positions: {a['positions']} vectors, mean norm {a['mean_norm']:.3f}")
        for row in frame[frame.distance.isin([0, 1, 2, 4, 8, 16, 32, 64, 128])].itertuples():
            click.echo(f"  distance {row.distance:>4}: mean cosine {row.mean_cosine:+.4f}")
        return
    for name, r in a["ropes"].items():
        click.echo(f"RoPE '{name}': {r['pairs']} frequency pairs, {r['inv_freq_first']:.3g} … "
                   f"{r['inv_freq_last']:.3g} rad per position")
    shown = [d for d in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256) if d <= max_distance]
    click.echo(f"q·k (scaled) of the last query (position {a['q_pos']}) and one key, moved Δ apart:")
    click.echo("  layer head  key " + "".join(f"{'Δ=' + str(d):>9}" for d in shown))
    for (ell, h), rows in frame.groupby(["layer", "head"]):
        by = dict(zip(rows["distance"], rows["score"]))
        click.echo(f"  {ell:>5} {h:>4} {int(rows['key_pos'].iloc[0]):>4} " + "".join(f"{by[d]:>9.3f}" for d in shown))


@click.command()
@prompt_option()
@click.option("--pos", type=int, default=None, help="Position (default: the prompt's last).")
@db_option
@json_option
def stats(prompt_id: int, pos: int | None, db: Path | None, as_json: bool) -> None:
    """Trajectory statistics of one position: lens top-1 and margin, entropy, KL, norm growth, cosine to final."""
    from geomap.analysis.stats_api import trajectory_stats

    frame = trajectory_stats(store_path(db), prompt_id, pos)
    a = frame.attrs
    if as_json:
        click.echo(json.dumps({**a, "layers": json.loads(frame.to_json(orient="records"))}, ensure_ascii=False))
        return
    click.echo(f"prompt {prompt_id} {a['text']!r}, position {a['pos']}: the model predicts "
               f"{_show(a['final']['token'])}; prediction depth {a['prediction_depth']}")
    # numbers right-aligned under their names; a margin of 137.102 (a layer-0 lens sure of itself) still fits
    click.echo(f"layer  {'lens top-1':<18} {'p':>6} {'margin':>8} {'entropy':>8} {'KL':>6} {'rank':>6} {'norm':>9} "
               f"{'growth':>7} {'cos_final':>10}")
    for r in frame.itertuples():
        if r.top1_id != r.top1_id or r.top1_id is None:  # no lens at this boundary
            click.echo(f"{r.layer:>5}  {'':<18} {'':>6} {'':>8} {'':>8} {'':>6} {'':>6} {r.norm:>9.1f}")
            continue
        growth = "" if r.norm_growth != r.norm_growth else f"{r.norm_growth:.3f}"
        click.echo(f"{r.layer:>5}  {_show(r.top1_token):<18} {r.top1_prob:>6.3f} {r.lens_margin:>8.3f} "
                   f"{r.entropy:>8.3f} {r.kl_to_final:>6.2f} {int(r.final_rank):>6} {r.norm:>9.1f} {growth:>7} "
                   f"{r.cos_final:>10.3f}")


@click.command("tuned-lens")
@click.option("--run", "run_id", type=int, required=True, help="Stored run whose states train the lens.")
@click.option("--steps", default=150, show_default=True, help="Adam steps per layer.")
@click.option("--heldout-every", default=5, show_default=True, help="Hold out every N-th prompt for the report.")
@db_option
@json_option
def tuned_lens(run_id: int, steps: int, heldout_every: int, db: Path | None, as_json: bool) -> None:
    """Train a tuned lens (per-layer affine translators) on a run; compare it with the logit lens on held-out data."""
    from geomap.analysis.tuned_api import tuned_lens as run
    from geomap.cli import quiet_transformers

    quiet_transformers()
    frame = run(store_path(db), run_id, steps, heldout_every)
    a = frame.attrs
    if as_json:
        click.echo(json.dumps({**a, "layers": frame.to_dict(orient="records")}))
        return
    click.echo(f"tuned lens {a['lens_id']}: trained on {a['train_prompts']} prompts, {a['heldout_prompts']} held out "
               f"({a['positions']} positions without BOS); held-out mean KL(lens ‖ final), nats:")
    click.echo("layer   tuned   logit  step kept")
    for r in frame.itertuples():
        click.echo(f"{r.layer:>5} {r.tuned_kl:>7.3f} {r.logit_kl:>7.3f} {r.steps:>10}")


COMMANDS = [decode, generate, geometry, attribute, project, position, stats, tuned_lens]

"""Analysis commands: decode, generate, geometry, attribute, project, position, stats."""

from __future__ import annotations

import json
from pathlib import Path

import click

from geomap.cli.store_cmds import _db, db_option

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
prompt_option = click.option("--prompt", "prompt_id", type=int, required=True, help="Stored prompt id.")


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
@prompt_option
@click.option("--pos", type=int, default=None, help="Position (default: the prompt's last).")
@strategy_options
@db_option
@json_option
def decode(prompt_id: int, pos: int | None, temperature, top_k, top_p, min_p, seed, db: Path | None,
           as_json: bool) -> None:
    """Decide the next token from stored logits (no model rerun); the decision is stored in `decisions`."""
    from geomap.analysis.api import decode as run

    frame = run(_db(db), prompt_id, make_strategy(temperature, top_k, top_p, min_p, seed), pos)
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
    from geomap.analysis.api import generate as run
    from geomap.cli import _quiet_transformers
    from geomap.models import load_model

    strategy = make_strategy(temperature, top_k, top_p, min_p, seed)
    _quiet_transformers()
    loaded = load_model(model_name, device=device)
    frame = run(_db(db), loaded, text, max_new_tokens, strategy)
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


COMMANDS = [decode, generate]

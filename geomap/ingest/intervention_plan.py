"""One description of a sweep for every face: a pipeline's ``[[interventions]]`` entry, the CLI, an HTTP body.

`InterventionSchema` is the strict pydantic shape (validated like the rest of a pipeline file, one-line errors);
`build_specs` turns it into the `Spec` list a sweep runs, against the loaded model and, for directions and mean
ablations taken from stored prompts, the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from geomap.intervene.sites import InterventionError, Site
from geomap.intervene.spec import Noise, Spec, vector_bytes

if TYPE_CHECKING:
    from geomap.models.loading import LoadedModel

Selection = Literal["all"] | list[int] | Annotated[str, Field(pattern=r"^-?\d*:-?\d*$")]

ALLOWED = {
    "operation": '"patch", "ablate", "steer" or "trace"',
    "prompt": "a non-empty string: the prompt whose run is changed",
    "site": '"resid", "attn", "mlp" or "head"',
    "layers": '"all", a list of layers (residual boundaries 0..L for site "resid") or a range "2:6"',
    "positions": '"all", a list of positions in the prompt (negative ones count from the end) or a range "-3:"',
    "heads": '"all", a list of heads (site "head") or a range "0:4"',
    "source": "a string: the prompt whose activations are copied in (patch, resample)",
    "ablation": '"zero", "mean" or "resample"',
    "mean_tag": "a string: the tag of the stored prompts a mean ablation averages over",
    "alphas": "a list of numbers: the steering coefficients",
    "direction_tokens": 'two one-token strings A and B: the direction u(A) - u(B)',
    "direction_tags": "two tags A and B: mean stored state of prompts tagged A minus B",
    "direction_state": "a stored state id (states.id)",
    "corrupt": "a string: the corrupted prompt of a trace (same length as the prompt)",
    "subject": "a string inside the prompt: a trace puts noise on its tokens",
    "noise": "a number above 0: the noise scale (× the embedding's std)",
    "seed": "a whole number: the noise seed",
    "window": "a whole number from 1 to 64: layers restored around each layer (attn, mlp traces)",
    "targets": "a list of one-token strings: the tokens the effects table reports",
    "name": "a non-empty string: the sweep's name",
}


class InterventionSchema(BaseModel):
    """One sweep of interventions (a pipeline's ``[[interventions]]`` entry)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    operation: Literal["patch", "ablate", "steer", "trace"]
    prompt: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)] | None = None
    site: Literal["resid", "attn", "mlp", "head"] = "resid"
    layers: Selection = "all"
    positions: Selection = "all"
    heads: Selection = "all"
    source: Annotated[str, Field(min_length=1)] | None = None
    ablation: Literal["zero", "mean", "resample"] = "zero"
    mean_tag: str | None = None
    alphas: list[float | int] = [0, 1, 2, 4, 8]
    direction_tokens: Annotated[list[str], Field(min_length=2, max_length=2)] | None = None
    direction_tags: Annotated[list[str], Field(min_length=2, max_length=2)] | None = None
    direction_state: int | None = None
    corrupt: Annotated[str, Field(min_length=1)] | None = None
    subject: Annotated[str, Field(min_length=1)] | None = None
    noise: Annotated[float | int, Field(gt=0)] = 3.0
    seed: int = 0
    window: Annotated[int, Field(ge=1, le=64)] = 1
    targets: list[str] = []

    def sweep_name(self) -> str:
        """The sweep's name: given, or the operation and the prompt."""
        return self.name or f"{self.operation}: {self.prompt}"


def validate_plan(data: dict, where: str) -> InterventionSchema:
    """Check one sweep's description; raise `InterventionError` with one line naming where, the key and the value."""
    try:
        return InterventionSchema.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [p for p in error["loc"] if isinstance(p, str)]
        key = next((p for p in loc if p in ALLOWED), loc[0] if loc else "")
        if error["type"] == "extra_forbidden":
            message = f"unknown key {key!r}; allowed here: {', '.join(InterventionSchema.model_fields)}"
        elif error["type"] == "missing":
            message = f"missing key {key!r}: {ALLOWED.get(key, 'required')}"
        else:
            value = data.get(key) if isinstance(data, dict) else data
            message = f"{key} = {value!r} is not allowed; {key} must be {ALLOWED.get(key, error['msg'])}"
        raise InterventionError(f"{where}: {message}") from None


def _pick(selection: Selection, top: int) -> list[int]:
    """A selection over 0..top-1: all, a list, or a Python-style slice "lo:hi" (negatives from the end)."""
    if selection == "all":
        return list(range(top))
    if isinstance(selection, str):
        lo, _, hi = selection.partition(":")
        return list(range(top))[slice(int(lo) if lo else None, int(hi) if hi else None)]
    return list(selection)


def cells(loaded: LoadedModel, plan: InterventionSchema) -> list[tuple[Site, int]]:
    """(site, position) cells: every chosen layer × head × position; positions count from the prompt's end."""
    from geomap.capture.tokens import encode

    a = loaded.anatomy
    n = len(encode(loaded.tokenizer, plan.prompt, a.context_window, "error").ids)
    top = a.n_layers + 1 if plan.site == "resid" else a.n_layers
    positions = [p - n if p >= 0 else p for p in _pick(plan.positions, n)]
    heads = _pick(plan.heads, a.n_heads) if plan.site == "head" else [None]
    return [(Site(plan.site, layer, head), pos) for layer in _pick(plan.layers, top) for head in heads
            for pos in positions]


def subject_positions(loaded: LoadedModel, prompt: str, subject: str) -> tuple[int, ...]:
    """Token positions of ``prompt`` covering the last occurrence of ``subject`` (by character offsets)."""
    start = prompt.rfind(subject)
    if not subject or start < 0:
        raise InterventionError(f"subject {subject!r} is not in the prompt {prompt!r}")
    end = start + len(subject)
    enc = loaded.tokenizer(prompt, return_offsets_mapping=True)
    out = tuple(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start)
    if not out:
        raise InterventionError(f"subject {subject!r} covers no token of the prompt")
    return out


def build_specs(loaded: LoadedModel, plan: InterventionSchema, db_path: str | Path | None) -> list[Spec]:
    """The specs of a plan (checked against the model; directions from the store read from ``db_path``)."""
    op = plan.operation
    grid = cells(loaded, plan)
    for site, _ in grid:
        site.check(loaded.anatomy)
    if op == "patch":
        if plan.source is None:
            raise InterventionError("patch needs a source prompt")
        return [Spec("patch", plan.prompt, s, (p,), source=plan.source) for s, p in grid]
    if op == "ablate":
        return _ablations(loaded, plan, grid, db_path)
    if op == "steer":
        return _steers(loaded, plan, grid, db_path)
    if (plan.corrupt is None) == (plan.subject is None):
        raise InterventionError("a trace needs a corrupt prompt or a subject (noise on it), one of them")
    if plan.corrupt is not None:
        return [Spec("trace", plan.corrupt, s, (p,), source=plan.prompt, window=plan.window) for s, p in grid]
    noisy = Noise(subject_positions(loaded, plan.prompt, plan.subject), float(plan.noise), plan.seed)
    return [Spec("trace", plan.prompt, s, (p,), noise=noisy, window=plan.window) for s, p in grid]


def _ablations(loaded, plan: InterventionSchema, grid, db_path) -> list[Spec]:
    from geomap.intervene.directions import site_mean

    if plan.ablation == "resample" and plan.source is None:
        raise InterventionError("a resample ablation needs a source prompt")
    if plan.ablation == "mean" and not plan.mean_tag:
        raise InterventionError("a mean ablation needs mean_tag (the tag of its stored prompts)")
    texts = _tagged_texts(db_path, plan.mean_tag) if plan.ablation == "mean" else []
    means = {s: vector_bytes(site_mean(loaded, texts, s)) for s in dict.fromkeys(s for s, _ in grid)} \
        if plan.ablation == "mean" else {}
    return [Spec("ablate", plan.prompt, s, (p,), ablation=plan.ablation,
                 source=plan.source if plan.ablation == "resample" else None, vector=means.get(s),
                 vector_label=f"mean over tag {plan.mean_tag}" if s in means else None) for s, p in grid]


def _steers(loaded, plan: InterventionSchema, grid, db_path) -> list[Spec]:
    from geomap.analysis.interventions import stored_state, tagged_mean_state
    from geomap.intervene.directions import unembed_direction

    given = [x is not None for x in (plan.direction_tokens, plan.direction_tags, plan.direction_state)]
    if sum(given) != 1:
        raise InterventionError("a steer needs one direction: direction_tokens, direction_tags or direction_state")
    directions: dict[int, tuple[np.ndarray, str]] = {}
    for site in dict.fromkeys(s for s, _ in grid):
        if plan.direction_tokens:
            plus, minus = plan.direction_tokens
            directions[site.layer] = (unembed_direction(loaded, plus, minus), f"u({plus!r}) - u({minus!r})")
        elif plan.direction_tags:
            plus, minus = plan.direction_tags
            vec = tagged_mean_state(db_path, plus, site.layer) - tagged_mean_state(db_path, minus, site.layer)
            directions[site.layer] = (vec, f"mean[{plus}] - mean[{minus}] at layer {site.layer}")
        else:
            directions[site.layer] = (stored_state(db_path, plan.direction_state), f"state {plan.direction_state}")
    positions = tuple(sorted({p for _, p in grid}))
    return [Spec("steer", plan.prompt, s, positions, vector=vector_bytes(directions[s.layer][0]),
                 vector_label=directions[s.layer][1], coefficient=float(alpha))
            for s in dict.fromkeys(s for s, _ in grid) for alpha in plan.alphas]


def _tagged_texts(db_path, tag: str) -> list[str]:
    from geomap.store.handle import Store

    with Store.use(db_path, "r") as opened, opened.snapshot() as con:
        rows = con.execute("SELECT DISTINCT text FROM prompts WHERE list_contains(tags, ?) AND status = 'done' "
                           "AND parent_id IS NULL ORDER BY text", [tag]).fetchall()
    if not rows:
        raise InterventionError(f"no stored prompt is tagged {tag!r}")
    return [r[0] for r in rows]


def run_plan(loaded: LoadedModel, plan: InterventionSchema, db_path: str | Path, batch_size: int = 16,
             config=None, engine=None):
    """Build a plan's specs and run its sweep (clean journeys captured with ``config``; batches on ``engine``)."""
    from geomap.ingest.interventions import sweep

    specs = build_specs(loaded, plan, db_path)
    return sweep(loaded, specs, db_path, plan.targets, name=plan.sweep_name(), batch_size=batch_size, config=config,
                 engine=engine)

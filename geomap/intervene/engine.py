"""Run interventions batched: many specs share one forward pass through the batch dimension.

A sweep first runs every prompt it names once, unedited, recording the sites it will read (the *baselines*: the
clean runs the specs change, and the sources they copy from). Then each spec becomes one batch row of edits, and
``batch_size`` rows go through the model per forward pass, so a sweep of L layers × T positions costs
⌈L·T / batch_size⌉ forwards plus one per distinct prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from geomap.capture.engine import pad_batch
from geomap.capture.tokens import Encoded, encode
from geomap.intervene.hooks import Edit, Edits
from geomap.intervene.sites import InterventionError, Site
from geomap.intervene.spec import Spec, aligned, resolve
from geomap.lru import Lru
from geomap.models.loading import LoadedModel


@dataclass(frozen=True)
class Baseline:
    """One prompt's unedited run.

    Attributes are its token ids, the residual stream (L+1, T, d), the last position's logits (V,) and the
    recorded site values {site: (T, width)}.
    """

    ids: np.ndarray
    resid: np.ndarray
    logits: np.ndarray
    values: dict[Site, torch.Tensor]


@dataclass(frozen=True)
class Outcome:
    """One spec's intervened run.

    Attributes are the spec, the residual stream (L+1, T, d), the last position's logits (V,), and where changes can
    start: the first residual boundary and the first position an edit touches. ``last_from`` is the first boundary
    where the last position can differ from the spec's reference run: below it the last position's residual is the
    reference's, in a causal model, so its lens statistics are the reference's too (the reference is the clean run,
    or for a trace with noise the corrupted run: the prompt with the noise alone).
    """

    spec: Spec
    resid: np.ndarray
    logits: np.ndarray
    first_layer: int
    first_pos: int
    last_from: int = 0


def _encode(loaded: LoadedModel, text: str) -> Encoded:
    return encode(loaded.tokenizer, text, loaded.anatomy.context_window, "error")


@torch.no_grad()
def forward(loaded: LoadedModel, batch: Sequence[np.ndarray], rows: list[list[Edit]],
            record: tuple[Site, ...] = ()) -> tuple[Edits, np.ndarray]:
    """One forward pass of right-padded token rows under per-row edits.

    Returns:
        The closed `Edits` (its ``resid`` and ``values`` hold the pass's tensors) and each row's last-position
        logits (B, V) as float32.
    """
    encoded = [Encoded(text="", ids=ids, truncated=False) for ids in batch]
    ids, mask = pad_batch(encoded, loaded.tokenizer.pad_token_id or 0)
    lengths = [len(x) for x in batch]
    last = sorted(set(n - 1 for n in lengths))
    with Edits(loaded.anatomy, rows, record) as edits:
        out = loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                           logits_to_keep=torch.tensor(last, device=loaded.device), use_cache=False)
    logits = out.logits.float()
    picked = torch.stack([logits[b, last.index(n - 1)] for b, n in enumerate(lengths)])
    return edits, picked.cpu().numpy()


def baselines(loaded: LoadedModel, texts: Sequence[str], sites: tuple[Site, ...],
              batch_size: int = 8) -> dict[str, Baseline]:
    """The unedited run of each distinct text, with the values of ``sites`` recorded."""
    out: dict[str, Baseline] = {}
    todo = list(dict.fromkeys(texts))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        ids = [_encode(loaded, t).ids for t in chunk]
        edits, logits = forward(loaded, ids, [[] for _ in chunk], sites)
        resid = torch.stack(edits.resid).float().cpu().numpy()
        for b, (text, row) in enumerate(zip(chunk, ids)):
            n = len(row)
            out[text] = Baseline(ids=row, resid=resid[:, b, :n], logits=logits[b],
                                 values={s: v[b, :n].float().cpu() for s, v in edits.values.items()})
    return out


_EMBED_STD: Lru[float] = Lru(8)  # the embedding's std by weights hash: a pass over V × d floats, once per model


def noise_value(loaded: LoadedModel, n_positions: int, scale: float, seed: int) -> torch.Tensor:
    """Seeded Gaussian noise (P, d), ``scale`` × the std of the model's (scaled) embedding rows."""
    a = loaded.anatomy
    std = _EMBED_STD.get_or_put(loaded.weights_hash, lambda: float(a.embed.weight.detach().float().std())) \
        * a.embed_scale
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn((n_positions, a.d_model), generator=generator) * (scale * std)


def needed_sites(specs: Sequence[Spec], n_layers: int) -> tuple[Site, ...]:
    """The sites whose baseline values some spec copies."""
    copies = [s for spec in specs if spec.operation in ("patch", "trace") or spec.ablation == "resample"
              for s in spec.sites(n_layers)]
    return tuple(dict.fromkeys(copies))


def edits_for(loaded: LoadedModel, spec: Spec, base: dict[str, Baseline]) -> tuple[np.ndarray, list[Edit], int, int]:
    """A spec as a batch row: its token ids, its edits, and the first boundary and position it can change."""
    a = loaded.anatomy
    target = base[spec.prompt]
    n = len(target.ids)
    sites = spec.sites(a.n_layers)
    for site in sites:
        site.check(a)
    edits: list[Edit] = []
    first_layer = min(s.first_boundary() for s in sites)
    if spec.operation == "trace" and spec.noise is not None:
        noisy = resolve(spec.noise.positions, n, "noise position")
        edits.append(Edit(Site("embed"), noisy, noise_value(loaded, len(noisy), spec.noise.scale, spec.noise.seed),
                          mode="add"))
        first_layer = 0
        source = target
        tpos, spos = resolve(spec.positions, n), resolve(spec.positions, n)
    elif spec.source is not None:
        source = base[spec.source]
        tpos, spos = aligned(spec, n, len(source.ids))
    else:
        source, tpos, spos = None, resolve(spec.positions, n), []
    for site in sites:
        width = site.width(a)
        if source is not None:
            value = source.values[site][spos]
            edits.append(Edit(site, tpos, value, "set"))
        elif spec.operation == "steer":
            vector = _vector(spec, width)
            edits.append(Edit(site, tpos, torch.from_numpy(vector * np.float32(spec.coefficient)), "add"))
        elif spec.ablation == "zero":
            edits.append(Edit(site, tpos, torch.zeros(width), "set"))
        else:  # mean ablation
            edits.append(Edit(site, tpos, torch.from_numpy(_vector(spec, width)), "set"))
    first_pos = min(min(e.positions) for e in edits)
    return target.ids, edits, first_layer, first_pos


def last_from(edits: Sequence[Edit], n: int) -> int:
    """The first boundary where the last of ``n`` positions can differ from the reference run (see `Outcome`).

    An edit at the last position shows there from its site's first boundary; an edit at an earlier position reaches
    the last one only through the next layer's attention, one boundary later. A trace's noise is part of its
    reference (the corrupted run), so it does not count.
    """
    bounds = [e.site.first_boundary() + (0 if n - 1 in e.positions else 1) for e in edits if e.site.kind != "embed"]
    return min(bounds, default=0)


def _vector(spec: Spec, width: int) -> np.ndarray:
    vector = spec.vector_array()
    if vector.shape != (width,):
        raise InterventionError(f"the vector has {vector.shape[0]} values; the site holds {width}")
    return vector.copy()


def run_specs(loaded: LoadedModel, specs: Sequence[Spec], base: dict[str, Baseline],
              batch_size: int = 16) -> Iterator[list[Outcome]]:
    """Run specs ``batch_size`` at a time (one forward pass each), yielding each batch's outcomes."""
    for start in range(0, len(specs), batch_size):
        chunk = specs[start:start + batch_size]
        rows = [edits_for(loaded, spec, base) for spec in chunk]
        edits, logits = forward(loaded, [r[0] for r in rows], [r[1] for r in rows])
        resid = torch.stack(edits.resid).float().cpu().numpy()
        yield [Outcome(spec, resid[:, b, :len(ids)], logits[b], first, pos, last_from(row_edits, len(ids)))
               for b, (spec, (ids, row_edits, first, pos)) in enumerate(zip(chunk, rows))]


def prepare(loaded: LoadedModel, specs: Sequence[Spec], batch_size: int = 8) -> dict[str, Baseline]:
    """The baselines a list of specs needs (every prompt and source, with the sites they copy)."""
    texts = [t for spec in specs for t in (spec.prompt, spec.source) if t is not None]
    return baselines(loaded, texts, needed_sites(specs, loaded.anatomy.n_layers), batch_size)

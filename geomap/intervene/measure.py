"""A batch of outcomes measured: the lens of the rows that changed (one GEMM per chunk), then each one's rows.

Below `Outcome.last_from` an intervened run's last position is its reference run's (the clean run, or for a noisy
trace the corrupted one), so the lens there is the reference's, computed once per reference. Only the boundaries from
``last_from`` up go through the unembedding, every outcome of a batch together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from geomap.capture.lens import Unembed
from geomap.intervene.effects import LensRows, delta_rows, effect_rows, lens_rows
from geomap.intervene.engine import Baseline, Outcome, reference
from geomap.intervene.spec import Spec
from geomap.models.loading import LoadedModel


@dataclass(frozen=True)
class Measured:
    """One outcome as the rows the store keeps: its delta and its effects (with token texts), and where it starts."""

    spec: Spec
    first_layer: int
    first_pos: int
    delta: dict
    effects: list[dict]


class Measure:
    """Turns batches of outcomes into `Measured` rows, the reference runs' lens computed once each.

    Args:
        loaded: The model.
        base: The clean runs of the specs' prompts (and sources).
        wanted: Target token ids for the effects; none: each prompt's clean top-1.
    """

    def __init__(self, loaded: LoadedModel, base: dict[str, Baseline], wanted: Sequence[int] = ()):
        self.loaded, self.base, self.wanted = loaded, base, list(wanted)
        self.unembed = Unembed(loaded.anatomy)
        self._lens: dict[str, LensRows] = {}

    def targets(self, prompt: str) -> list[int]:
        """The target tokens of a prompt's effects."""
        return self.wanted or [int(np.argmax(self.base[prompt].logits))]

    def _last(self, resid: np.ndarray, prompt: str) -> LensRows:
        rows = resid[:, -1]
        return lens_rows(self.unembed, rows, np.tile(self.targets(prompt), (len(rows), 1)))

    def clean(self, prompt: str) -> LensRows:
        """The clean run's lens at the last position, every boundary."""
        if prompt not in self._lens:
            self._lens[prompt] = self._last(self.base[prompt].resid, prompt)
        return self._lens[prompt]

    def reference(self, spec: Spec) -> LensRows:
        """The lens of the run a spec's outcome equals below its ``last_from``, every boundary."""
        if spec.noise is None:
            return self.clean(spec.prompt)
        key = f"{spec.prompt}\0{spec.noise}"
        if key not in self._lens:
            self._lens[key] = self._last(reference(self.loaded, spec, self.base).resid, spec.prompt)
        return self._lens[key]

    def batch(self, outcomes: Sequence[Outcome]) -> list[Measured]:
        """Measure a batch: one lens pass over every outcome's changed boundaries, then delta and effects rows."""
        n_bounds = self.loaded.anatomy.n_layers + 1
        starts = [min(o.last_from, n_bounds) for o in outcomes]
        rows = [o.resid[s:, -1] for o, s in zip(outcomes, starts)]
        targets = [np.tile(self.targets(o.spec.prompt), (len(r), 1)) for o, r in zip(outcomes, rows)]
        width = len(self.targets(outcomes[0].spec.prompt)) if outcomes else 0
        if any(len(r) for r in rows):
            fresh = lens_rows(self.unembed, np.concatenate(rows), np.concatenate(targets).reshape(-1, width))
        out, at = [], 0
        for outcome, start, part in zip(outcomes, starts, rows):
            ref = self.reference(outcome.spec)
            lens = ref
            if len(part):
                got = fresh.take(slice(at, at + len(part)))
                at += len(part)
                lens = LensRows(np.concatenate([ref.top1_id[:start], got.top1_id]),
                                np.concatenate([ref.top1_prob[:start], got.top1_prob]),
                                np.concatenate([ref.ranks[:start], got.ranks]))
            prompt = outcome.spec.prompt
            effects = effect_rows(outcome, self.base[prompt], self.targets(prompt), self.clean(prompt), lens)
            for row in effects:
                row["token"] = self.loaded.tokenizer.decode([row["token_id"]])
            out.append(Measured(outcome.spec, outcome.first_layer, outcome.first_pos, delta_rows(outcome, lens),
                                effects))
        return out

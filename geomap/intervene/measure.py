"""A batch of outcomes measured: the lens of rows not seen before (one blocked pass per batch), then each one's rows.

The lens rows of a batch are the last position at every boundary of every outcome, and most of them repeat:

- below `Outcome.last_from` an intervened run's last position is its reference run's (the clean run, or for a noisy
  trace the corrupted one), so its lens there is the reference's, taken once per reference and boundary;
- an edit that changes nothing (restoring a position the corruption has not reached yet, or the last position
  itself at its own boundary) leaves rows equal, bit for bit, to rows the sweep has already measured: each row is
  keyed by its content (and targets), and a key measured once is not measured again;
- the last boundary's lens is the model's own output distribution, read off the logits of the forward pass.

What is left goes through the unembedding together, once per batch (`geomap.intervene.scan.lens_rows`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from geomap.capture.lens import Unembed
from geomap.intervene.effects import Finals, delta_rows, effect_rows, finals
from geomap.intervene.engine import Baseline, Outcome
from geomap.intervene.scan import LensRows, lens_rows
from geomap.intervene.spec import Spec
from geomap.models.loading import LoadedModel

_KEPT = 1 << 16  # lens rows kept by content beyond the reference runs' (dropped together when exceeded)


@dataclass(frozen=True)
class Measured:
    """One outcome as the rows the store keeps: its delta and its effects (with token texts), and where it starts."""

    spec: Spec
    first_layer: int
    first_pos: int
    delta: dict
    effects: list[dict]


class Measure:
    """Turns batches of outcomes into `Measured` rows, each distinct lens row computed once.

    Args:
        loaded: The model.
        base: The clean runs of the specs' prompts (and sources).
        wanted: Target token ids for the effects; none: each prompt's clean top-1.

    ``scanned`` counts the rows that went through the unembedding.
    """

    def __init__(self, loaded: LoadedModel, base: dict[str, Baseline], wanted: Sequence[int] = ()):
        self.loaded, self.base, self.wanted = loaded, base, list(wanted)
        self.unembed = Unembed(loaded.anatomy)
        self.n_bounds = loaded.anatomy.n_layers + 1
        self.scanned = 0
        self._rows: dict[bytes, tuple[int, float, tuple[int, ...]]] = {}  # a row's lens by content key
        self._alias: dict[tuple[Hashable, int], bytes] = {}  # (reference run, boundary) -> its row's key
        self._clean: dict[str, tuple[Finals, list[bytes]]] = {}
        self._tokens: dict[int, str] = {}

    def targets(self, prompt: str) -> list[int]:
        """The target tokens of a prompt's effects."""
        return self.wanted or [int(np.argmax(self.base[prompt].logits))]

    def batch(self, outcomes: Sequence[Outcome]) -> list[Measured]:
        """Measure a batch: one lens pass over the rows not measured yet, then delta and effects rows."""
        if not outcomes:
            return []
        targets = np.array([self.targets(o.spec.prompt) for o in outcomes], np.int64)
        pending: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        for prompt in dict.fromkeys(o.spec.prompt for o in outcomes):
            self._plan_clean(prompt, pending)
        final = finals(np.stack([o.logits for o in outcomes]), targets)
        keys = [self._plan(o, b, final, targets[b], pending) for b, o in enumerate(outcomes)]
        self._scan(pending)
        lens = [self._lens(k) for k in keys]
        clean = [self._clean[o.spec.prompt] for o in outcomes]
        effects = effect_rows(final, [c[0] for c in clean], targets, [self._lens(c[1]) for c in clean], lens)
        out = []
        for outcome, rows, row_lens in zip(outcomes, effects, lens):
            for row in rows:
                row["token"] = self._token(row["token_id"])
            out.append(Measured(outcome.spec, outcome.first_layer, outcome.first_pos, delta_rows(outcome, row_lens),
                                rows))
        if len(self._rows) > _KEPT:
            kept = set(self._alias.values())
            self._rows = {k: v for k, v in self._rows.items() if k in kept}
        return out

    def _plan_clean(self, prompt: str, pending: dict) -> None:
        """The clean run's final distribution, and its rows as the reference of the prompt's noiseless specs."""
        if prompt in self._clean:
            return
        run = self.base[prompt]
        targets = np.array([self.targets(prompt)], np.int64)
        final = finals(run.logits[None], targets)
        keys = []
        for layer in range(self.n_bounds):
            key = self._key(run.resid[layer, -1], targets[0])
            self._alias[(prompt, layer)] = key
            self._want(key, run.resid[layer, -1], targets[0], final, 0, layer, pending)
            keys.append(key)
        self._clean[prompt] = (final, keys)

    def _plan(self, outcome: Outcome, b: int, final: Finals, targets: np.ndarray, pending: dict) -> list[bytes]:
        """The keys of an outcome's lens rows (every boundary), queueing the ones not measured yet."""
        spec = outcome.spec
        reference = spec.prompt if spec.noise is None else (spec.prompt, spec.noise)
        keys = []
        for layer in range(self.n_bounds):
            row = outcome.resid[layer, -1]
            key = self._alias.get((reference, layer)) if layer < outcome.last_from else None
            if key is None:
                key = self._key(row, targets)
                if layer < outcome.last_from:  # a noisy trace's corrupted run: its first outcome's row stands for it
                    self._alias[(reference, layer)] = key
            self._want(key, row, targets, final, b, layer, pending)
            keys.append(key)
        return keys

    def _want(self, key: bytes, row: np.ndarray, targets: np.ndarray, final: Finals, b: int, layer: int,
              pending: dict) -> None:
        if key in self._rows or key in pending:
            return
        if layer == self.n_bounds - 1:  # the lens at the last boundary is the model's output
            self._rows[key] = (int(final.lens.top1_id[b]), float(final.lens.top1_prob[b]),
                               tuple(int(r) for r in final.lens.ranks[b]))
        else:
            pending[key] = (row, targets)

    def _scan(self, pending: dict[bytes, tuple[np.ndarray, np.ndarray]]) -> None:
        if not pending:
            return
        rows = np.stack([r for r, _ in pending.values()])
        got = lens_rows(self.unembed, rows, np.stack([t for _, t in pending.values()]))
        for i, key in enumerate(pending):
            self._rows[key] = (int(got.top1_id[i]), float(got.top1_prob[i]), tuple(int(r) for r in got.ranks[i]))
        self.scanned += len(rows)

    def _lens(self, keys: list[bytes]) -> LensRows:
        values = [self._rows[k] for k in keys]
        return LensRows(np.array([v[0] for v in values], np.int32), np.array([v[1] for v in values], np.float32),
                        np.array([v[2] for v in values], np.int32).reshape(len(keys), -1))

    @staticmethod
    def _key(row: np.ndarray, targets: np.ndarray) -> bytes:
        """A residual row's content key: equal rows (bit for bit) with equal targets have equal lens rows."""
        return hashlib.blake2b(np.ascontiguousarray(row).tobytes() + targets.tobytes(), digest_size=16).digest()

    def _token(self, token_id: int) -> str:
        if token_id not in self._tokens:
            self._tokens[token_id] = self.loaded.tokenizer.decode([token_id])
        return self._tokens[token_id]

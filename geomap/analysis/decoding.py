"""Decoding decisions from logits: greedy, temperature, top-k, top-p (nucleus), min-p, and combinations.

The filters apply in transformers' order (``GenerationMixin._get_logits_processor``): temperature, then top-k,
then top-p, then min-p, each on the previous one's output, with the same comparisons (top-k keeps ties with
the k-th score; top-p removes tokens whose ascending cumulative probability is ≤ 1 − p; min-p removes tokens
below ``min_p`` × the top probability; each keeps at least one token).

Exact and approximate decisions:
    With the full-vocabulary logits (a prompt's last position, or a live model) every decision is exact.
    Elsewhere the store keeps only the top-k logits and the full logsumexp. The unseen tail then has a known
    mass at temperature 1 (``tail_mass``) but unknown logits. A decision is still exact when its cut provably
    falls inside the stored candidates: greedy; a top-k no larger than the stored k; top-p at temperature 1
    whose kept set closes inside them; min-p whose logit threshold (top logit + T·log min_p) lies above the
    lowest stored logit. Otherwise the tail is dropped (the kept set and probabilities are computed over the
    stored candidates alone) and the decision is flagged ``exact = False``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from geomap.errors import GeomapError


class DecodingError(GeomapError):
    """A decoding strategy's parameters are out of range."""


@dataclass(frozen=True)
class Strategy:
    """A decoding strategy. Greedy when no sampling option is set.

    Attributes:
        temperature: Divides the logits (> 0); 1 leaves them.
        top_k: Keep the k highest scores (ties with the k-th included).
        top_p: Keep the most probable tokens whose cumulative mass reaches p (0 < p ≤ 1).
        min_p: Keep tokens with probability ≥ min_p × the top probability (0 ≤ min_p ≤ 1).
        seed: Seed of the sampling draw (sampling only; default 0).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise DecodingError(f"temperature must be a positive number, not {self.temperature}; "
                                "for greedy decoding leave every sampling option out")
        if self.top_k is not None and self.top_k < 1:
            raise DecodingError(f"top_k must be at least 1, not {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise DecodingError(f"top_p must lie in (0, 1], not {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise DecodingError(f"min_p must lie in [0, 1], not {self.min_p}")

    @property
    def greedy(self) -> bool:
        """True when no sampling option is set (transformers' ``do_sample=False``)."""
        return (self.temperature == 1.0 and self.top_k is None and self.top_p is None and self.min_p is None
                and self.seed is None)

    @property
    def name(self) -> str:
        """``greedy``, or the sampling filters in the order they apply (``temperature+top_k+...``)."""
        if self.greedy:
            return "greedy"
        parts = [n for n, on in (("temperature", self.temperature != 1.0), ("top_k", self.top_k is not None),
                                 ("top_p", self.top_p is not None), ("min_p", self.min_p is not None)) if on]
        return "sample" + "".join(f"+{p}" for p in parts)

    def to_dict(self) -> dict:
        """The strategy as plain JSON-able values (``seed`` resolved: 0 when sampling without one)."""
        return {"strategy": self.name, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "min_p": self.min_p, "seed": None if self.greedy else (self.seed or 0)}


@dataclass(frozen=True)
class Candidates:
    """Next-token logits to decide from.

    Attributes:
        ids: (n,) token ids, by descending logit.
        logits: (n,) their logits (float32).
        logsumexp: Log of the full-vocabulary softmax normaliser at temperature 1.
        complete: True when ``ids`` cover the whole vocabulary.
    """

    ids: np.ndarray
    logits: np.ndarray
    logsumexp: float
    complete: bool

    @classmethod
    def from_full(cls, logits: np.ndarray) -> Candidates:
        """All V logits (a last position's ``final_logits``, or a live model's)."""
        z = np.asarray(logits, dtype=np.float32)
        order = np.argsort(-z, kind="stable")  # descending, ties in id order (as torch's stable argsort)
        top = float(z[order[0]]) if len(z) else 0.0
        lse = top + float(np.log(np.sum(np.exp(z.astype(np.float64) - top)))) if len(z) else float("-inf")
        return cls(order.astype(np.int64), z[order], lse, True)

    @property
    def tail_mass(self) -> float:
        """Probability (temperature 1) of the tokens not in ``ids``."""
        if self.complete:
            return 0.0
        seen = float(np.exp(np.asarray(self.logits, np.float64) - self.logsumexp).sum())
        return max(0.0, 1.0 - seen)


@dataclass(frozen=True)
class Decision:
    """One decoding decision.

    Attributes:
        strategy: What was applied.
        kept_ids: (m,) the kept candidate set, by descending probability.
        kept_probs: (m,) their renormalised probabilities (sum to 1).
        cut_mass: Mass of the kept set under the temperature-scaled distribution before the cuts; None when
            that distribution's normaliser is unknown (stored top-k only, temperature ≠ 1).
        chosen_id: The chosen token.
        chosen_rank: Its 1-based rank by raw logit among all candidates.
        chosen_prob: Its renormalised probability.
        model_prob: Its probability under the model's own distribution (temperature 1, no cut).
        exact: False when the unseen tail could change the decision (see the module docstring).
        tail_mass: Mass of the tokens beyond the stored candidates at temperature 1 (0 with full logits).
    """

    strategy: Strategy
    kept_ids: np.ndarray
    kept_probs: np.ndarray
    cut_mass: float | None
    chosen_id: int
    chosen_rank: int
    chosen_prob: float
    model_prob: float
    exact: bool
    tail_mass: float


def decide(candidates: Candidates, strategy: Strategy) -> Decision:
    """Apply a strategy to candidate logits and make the decision (a seeded draw when sampling)."""
    ids = np.asarray(candidates.ids, dtype=np.int64)
    tail_mass = candidates.tail_mass
    if strategy.greedy:
        top = float(candidates.logits[0])
        p_top = math.exp(top - candidates.logsumexp)
        return Decision(strategy, ids[:1], np.ones(1, np.float32), p_top, int(ids[0]), 1, 1.0, p_top, True,
                        tail_mass)
    import torch  # sampling only: reading and greedy decoding stay torch-free (a report's CLI loads no torch)

    # Work in vocabulary order with full logits (so ties break as in transformers), else in stored order.
    if candidates.complete:
        z = torch.empty(len(ids), dtype=torch.float32)
        z[torch.from_numpy(ids)] = torch.as_tensor(np.asarray(candidates.logits, dtype=np.float32))
        token = np.arange(len(ids))
    else:
        z, token = torch.as_tensor(np.asarray(candidates.logits, dtype=np.float32)), ids
    t = strategy.temperature
    scores = z / t if t != 1.0 else z.clone()
    # Log-mass of the unseen tail, on the scale of `scores`: known only at temperature 1.
    tail = math.log(tail_mass) + candidates.logsumexp if tail_mass > 0 and t == 1.0 else None
    before = _log_norm(scores, tail)
    closed = candidates.complete  # the kept set provably excludes every unseen token
    broken = False  # a cut fell (or may have fallen) among unseen tokens
    if strategy.top_k is not None:
        k = min(strategy.top_k, len(scores))
        scores = scores.masked_fill(scores < scores.topk(k).values[-1], -math.inf)
        closed, broken = _stage(closed, broken, k < len(scores))
        tail = None if closed else tail
    if strategy.top_p is not None:
        known = closed or t == 1.0  # the tail's share is unknown at other temperatures
        scores, inside = _top_p(scores, strategy.top_p, tail)
        closed, broken = _stage(closed, broken, known and inside)
        tail = None
    if strategy.min_p is not None:
        probs = torch.softmax(scores, -1)
        remove = probs < strategy.min_p * probs.max()
        remove[probs.argmax()] = False
        scores = scores.masked_fill(remove, -math.inf)
        floor = (math.log(strategy.min_p) if strategy.min_p > 0 else -math.inf) + float(z.max()) / t
        closed, broken = _stage(closed, broken, float(z.min()) / t < floor)
    kept = torch.nonzero(torch.isfinite(scores))[:, 0]
    probs = torch.softmax(scores, -1)
    order = kept[torch.argsort(probs[kept], descending=True, stable=True)]
    cut_mass = math.exp(float(torch.logsumexp((z.double() / t)[order], 0)) - before)
    if not candidates.complete and t != 1.0:
        cut_mass = None  # the tail's mass at this temperature is unknown
    generator = torch.Generator().manual_seed(int(strategy.seed or 0))
    pick = int(order[torch.multinomial(probs[order], 1, generator=generator)])
    rank = 1 + int((z > z[pick]).sum())
    return Decision(strategy, token[order.numpy()], probs[order].numpy().astype(np.float32),
                    None if cut_mass is None else min(cut_mass, 1.0),
                    int(token[pick]), rank, float(probs[pick]), math.exp(float(z[pick]) - candidates.logsumexp),
                    closed and not broken, tail_mass)


def _stage(closed: bool, broken: bool, closes: bool) -> tuple[bool, bool]:
    """Exactness after one cut: once closed, later cuts are exact; a cut that cannot close breaks exactness."""
    if closed or broken:
        return closed, broken
    return (True, False) if closes else (False, True)


def _log_norm(scores: torch.Tensor, tail: float | None) -> float:
    """Log of Σ exp(scores), plus the tail's mass when known."""
    import torch

    total = float(torch.logsumexp(scores.double(), 0))
    return total if tail is None else float(np.logaddexp(total, tail))


def _top_p(scores: torch.Tensor, top_p: float, tail: float | None) -> tuple[torch.Tensor, bool]:
    """Transformers' nucleus filter; ``tail`` is the log-mass of unseen tokens below all scores, when known.

    Returns:
        The filtered scores, and whether every unseen token is removed (always True without a tail).
    """
    import torch

    sorted_scores, order = torch.sort(scores, descending=False)
    if tail is None:
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        tail_mass = 0.0
    else:
        norm = _log_norm(scores, tail)
        tail_mass = math.exp(tail - norm)
        cumulative = (tail_mass + torch.exp(sorted_scores.double() - norm).cumsum(dim=-1)).float()
    remove = cumulative <= (1 - top_p)
    remove[-1:] = False
    return scores.masked_fill(remove.scatter(0, order, remove), -math.inf), tail_mass <= 1 - top_p

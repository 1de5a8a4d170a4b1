"""An outcome as rows: its delta against the clean journey, and its effects on target tokens.

The delta keeps what an intervention can change in a causal model: every position from the first one an edit
touches, with vectors from the first residual boundary it touches (below it a row carries only the norm and the
cosine to the final residual, which moves with the final layer). The effects compare the last position's final
distribution with the clean one, and the logit lens top-1 at the last position layer by layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from geomap.intervene.engine import Outcome
from geomap.intervene.scan import LensRows, final_rows


@dataclass(frozen=True)
class Finals:
    """The final distributions at the last position of some runs (a batch's, or one clean run's).

    Attributes are the model's ``logits`` (R, V) float32, their ``logprobs`` (R, V) in float64 (the KL of two
    nearly equal runs is a small difference of large terms), and their ``lens`` statistics for the targets (R rows).
    """

    logits: np.ndarray
    logprobs: torch.Tensor
    lens: LensRows

    @cached_property
    def probs(self) -> torch.Tensor:
        """The probabilities (R, V), float64."""
        return self.logprobs.exp()


def finals(logits: np.ndarray, targets: np.ndarray) -> Finals:
    """`Finals` of logits (R, V) for target ids (R, K): one log-softmax and one statistics pass for all rows."""
    z = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    return Finals(logits, torch.log_softmax(z.double(), -1), final_rows(z, torch.from_numpy(targets.astype(np.int64))))


def delta_rows(outcome: Outcome, lens: LensRows) -> dict[str, np.ndarray | list]:
    """The delta of one outcome: rows at positions >= first_pos, every boundary (layer-major, then position).

    Args:
        outcome: The intervened run.
        lens: The lens at the last position, one row per boundary (L+1 rows).
    """
    resid = outcome.resid
    n_bounds, n, _ = resid.shape
    positions = np.arange(outcome.first_pos, n)
    layer_idx, pos_idx = np.meshgrid(np.arange(n_bounds), positions, indexing="ij")
    part = resid[:, outcome.first_pos:]
    norms = np.linalg.norm(part, axis=-1)
    final = part[-1][None]
    cos = (part * final).sum(-1) / np.maximum(norms * np.linalg.norm(final, axis=-1), 1e-30)
    vectors = [part[layer, i] if layer >= outcome.first_layer else None
               for layer in range(n_bounds) for i in range(len(positions))]
    last = pos_idx == n - 1
    ids = np.where(last, lens.top1_id[layer_idx], -1).reshape(-1)
    probs = np.where(last, lens.top1_prob[layer_idx], np.nan).reshape(-1)
    return {"pos": pos_idx.reshape(-1).astype(np.int32), "layer": layer_idx.reshape(-1).astype(np.int16),
            "norm": norms.reshape(-1).astype(np.float32), "cos_final": cos.reshape(-1).astype(np.float32),
            "vec": vectors, "top1_id": ids, "top1_prob": probs}


def effect_rows(final: Finals, clean: Sequence[Finals], targets: np.ndarray, clean_lens: Sequence[LensRows],
                lens: Sequence[LensRows]) -> list[list[dict]]:
    """Effects on each target token of a batch of outcomes, one list of rows per outcome.

    Args:
        final: The outcomes' final distributions (one row each).
        clean: Per outcome, the final distribution of the clean run of its prompt (one row).
        targets: (B, K) token ids to report per outcome.
        clean_lens: Per outcome, the clean run's lens at the last position, per boundary (L+1 rows).
        lens: Per outcome, the intervened run's.
    """
    kl = torch.zeros(len(clean), dtype=torch.float64)
    groups: dict[int, list[int]] = {}
    for b, c in enumerate(clean):
        groups.setdefault(id(c), []).append(b)
    for rows in groups.values():  # KL(clean ‖ intervened) = Σ p_c·(log p_c − log p_i), per clean run
        c = clean[rows[0]]
        kl[rows] = (c.probs[0] * (c.logprobs[0] - final.logprobs[rows])).sum(-1)
    kl = kl.tolist()
    index = torch.from_numpy(targets.astype(np.int64))
    probs = final.logprobs.gather(1, index).exp().tolist()
    clean_probs = [c.logprobs[0, index[b]].exp().tolist() for b, c in enumerate(clean)]
    out = []
    for b, (c, c_lens, b_lens) in enumerate(zip(clean, clean_lens, lens)):
        differs = np.flatnonzero(b_lens.top1_id != c_lens.top1_id)
        top_i, top_c = int(final.lens.top1_id[b]), int(c.lens.top1_id[0])
        rows = []
        for j, t in enumerate(targets[b]):
            logit, clean_logit = float(final.logits[b, t]), float(c.logits[0, t])
            prob, clean_prob = probs[b][j], clean_probs[b][j]
            rows.append({"token_id": int(t), "logit": logit, "prob": prob, "rank": int(final.lens.ranks[b, j]),
                         "clean_logit": clean_logit, "clean_prob": clean_prob,
                         "clean_rank": int(c.lens.ranks[0, j]), "logit_change": logit - clean_logit,
                         "prob_change": prob - clean_prob, "kl": kl[b], "top1_id": top_i,
                         "top1_changed": top_i != top_c, "first_flip_layer": int(differs[0]) if len(differs) else None,
                         "lens_ranks": b_lens.ranks[:, j].tolist(), "clean_lens_ranks": c_lens.ranks[:, j].tolist()})
        out.append(rows)
    return out

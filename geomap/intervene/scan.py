"""The logit lens of residual rows in one blocked pass over the unembedding, and the same statistics of final logits.

A lens row is what the effects and the delta keep of a distribution: its top-1 id and probability, and the 1-based
rank of some target tokens (1 + the tokens whose raw logit is higher). `lens_rows` computes them for many rows in
one pass over the vocabulary in cache-sized blocks (one GEMM each, `Unembed.block`), with an online update of

    top-1,   lse(z) = m + log Σ e^(z−m),   #{z > z_target}

so that no row holds its whole vocabulary of logits at once, and nothing is sorted. A target's own logit must come from
the same GEMM as the logits it is compared with, so the blocks holding a target go first (kept until every
threshold is known) and the rest are counted as they stream. `final_rows` reads the same statistics off logits the
model computed itself (the last boundary's lens is the model's output, and needs no second GEMM).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from geomap.capture.lens import Unembed

_BLOCK_FLOATS = 1 << 22  # rows × vocabulary per GEMM (16 MB of float32: few, large GEMMs run fastest on a CPU)
_ROWS = 512  # rows per pass over the unembedding


@dataclass(frozen=True)
class LensRows:
    """The logit lens of some residual rows: top-1 id and probability, and the 1-based ranks of target tokens.

    Attributes are ``top1_id`` (R,) int32, ``top1_prob`` (R,) float32 and ``ranks`` (R, K) int32 (K targets).
    """

    top1_id: np.ndarray
    top1_prob: np.ndarray
    ranks: np.ndarray

    def take(self, index) -> LensRows:
        """Rows ``index`` of these rows."""
        return LensRows(self.top1_id[index], self.top1_prob[index], self.ranks[index])


def final_rows(logits: torch.Tensor, targets: torch.Tensor) -> LensRows:
    """The lens statistics of float32 logits (R, V) the model computed, for target ids (R, K)."""
    top = logits.max(dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    own = logits.gather(1, targets)
    above = _count(logits, own)
    return LensRows(top.indices.numpy().astype(np.int32), torch.exp(top.values - lse).numpy(),
                    (above + 1).numpy().astype(np.int32))


def lens_rows(unembed: Unembed, resid: np.ndarray, targets: np.ndarray) -> LensRows:
    """The lens of (R, d) residual rows through the model's final norm and unembedding.

    Args:
        unembed: The model's final norm and unembedding.
        resid: Residual rows.
        targets: (R, K) token ids whose rank each row reports (on raw logits: 1 + the tokens scoring higher).
    """
    n, k = targets.shape
    ids, probs, ranks = np.zeros(n, np.int32), np.zeros(n, np.float32), np.zeros((n, k), np.int32)
    rows, wanted = torch.from_numpy(np.ascontiguousarray(resid)), torch.from_numpy(targets.astype(np.int64))
    for start in range(0, n, _ROWS):
        stop = min(n, start + _ROWS)
        got = _scan(unembed, unembed.normed(rows[start:stop]), wanted[start:stop])
        ids[start:stop], probs[start:stop], ranks[start:stop] = got.top1_id, got.top1_prob, got.ranks
    return LensRows(ids, probs, ranks)


def _count(z: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """#{z > threshold} per row (n,) for each of the K thresholds (n, K): (n, K) int64."""
    if thresholds.shape[1] == 0:
        return torch.zeros(thresholds.shape, dtype=torch.long)
    return torch.stack([(z > thresholds[:, j:j + 1]).sum(-1) for j in range(thresholds.shape[1])], -1)


def _scan(unembed: Unembed, x: torch.Tensor, targets: torch.Tensor) -> LensRows:
    """One pass over the vocabulary for normed rows ``x`` (n, d) and their targets (n, K)."""
    n, vocab = x.shape[0], unembed.vocab_size
    step = max(1, _BLOCK_FLOATS // max(n, 1))
    first = sorted({int(t) // step * step for t in targets.unique()})  # the blocks holding a target go first
    order = first + sorted(set(range(0, vocab, step)) - set(first))
    m = torch.full((n,), -torch.inf)
    total = torch.zeros(n)
    best, best_id = torch.full((n,), -torch.inf), torch.zeros(n, dtype=torch.long)
    thresholds = torch.zeros(targets.shape)
    above = torch.zeros(targets.shape, dtype=torch.long)
    held, holding = [], set(first)
    for start in order:
        stop = min(vocab, start + step)
        z = unembed.block(x, start, stop)
        if start in holding:
            z = z.clone()  # the buffer is reused; these logits are counted once every threshold is known
            held.append(z)
            row, col = ((targets >= start) & (targets < stop)).nonzero(as_tuple=True)
            thresholds[row, col] = z[row, targets[row, col] - start]
        else:
            above += _count(z, thresholds)
        value, index = z.max(dim=-1)
        index += start
        better = (value > best) | ((value == best) & (index < best_id))  # a tie goes to the lowest id
        best, best_id = torch.where(better, value, best), torch.where(better, index, best_id)
        new_m = torch.maximum(m, value)
        centred = z - new_m[:, None] if start in holding else z.sub_(new_m[:, None])
        total = total * torch.exp(m - new_m) + centred.exp_().sum(-1)
        m = new_m
    for z in held:
        above += _count(z, thresholds)
    prob = torch.exp(best - m) / total
    return LensRows(best_id.numpy().astype(np.int32), prob.numpy(), (above + 1).numpy().astype(np.int32))

"""An outcome as rows: its delta against the clean journey, and its effects on target tokens.

The delta keeps what an intervention can change in a causal model: every position from the first one an edit
touches, with vectors from the first residual boundary it touches (below it a row carries only the norm and the
cosine to the final residual, which moves with the final layer). The effects compare the last position's final
distribution with the clean one, and the logit lens top-1 at the last position layer by layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from geomap.capture.lens import Unembed
from geomap.intervene.engine import Baseline, Outcome


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


def lens_rows(unembed: Unembed, resid: np.ndarray, targets: np.ndarray, chunk: int = 128) -> LensRows:
    """The lens of (R, d) residuals in one pass over the unembedding per ``chunk`` rows (one GEMM each).

    Args:
        unembed: The model's final norm and unembedding.
        resid: Residual rows.
        targets: (R, K) token ids whose rank each row reports (on raw logits: 1 + the tokens scoring higher).
        chunk: Rows per GEMM (each holds chunk × vocabulary float32 logits).
    """
    n, k = resid.shape[0], targets.shape[1]
    ids, probs, ranks = np.zeros(n, np.int32), np.zeros(n, np.float32), np.zeros((n, k), np.int32)
    rows, wanted = torch.from_numpy(np.ascontiguousarray(resid)), torch.from_numpy(targets.astype(np.int64))
    for start in range(0, n, chunk):
        logits = unembed.logits(rows[start:start + chunk])
        top = logits.max(dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        own = logits.gather(1, wanted[start:start + chunk])
        above = torch.stack([(logits > own[:, j:j + 1]).sum(-1) for j in range(k)], -1) if k else own.long()
        stop = start + logits.shape[0]
        ids[start:stop], probs[start:stop] = top.indices.numpy(), torch.exp(top.values - lse).numpy()
        ranks[start:stop] = above.numpy() + 1
    return LensRows(ids, probs, ranks)


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


def effect_rows(outcome: Outcome, clean: Baseline, targets: Sequence[int], clean_lens: LensRows,
                lens: LensRows) -> list[dict]:
    """Effects on each target token of one outcome.

    Args:
        outcome: The intervened run.
        clean: The clean run of the same prompt.
        targets: Token ids to report.
        clean_lens: The clean run's lens at the last position, per boundary (L+1 rows, ranks of ``targets``).
        lens: The intervened run's.
    """
    clean_top1, top1 = clean_lens.top1_id, lens.top1_id
    lp_i = torch.log_softmax(torch.from_numpy(outcome.logits).double(), -1)
    lp_c = torch.log_softmax(torch.from_numpy(clean.logits).double(), -1)
    kl = float((lp_c.exp() * (lp_c - lp_i)).sum())
    differs = np.flatnonzero(top1 != clean_top1)
    first_flip = int(differs[0]) if len(differs) else None
    top_i, top_c = int(np.argmax(outcome.logits)), int(np.argmax(clean.logits))
    rows = []
    for j, t in enumerate(targets):
        logit, clean_logit = float(outcome.logits[t]), float(clean.logits[t])
        prob, clean_prob = float(lp_i[t].exp()), float(lp_c[t].exp())
        rows.append({"token_id": int(t), "logit": logit, "prob": prob,
                     "rank": int((outcome.logits > outcome.logits[t]).sum()) + 1,
                     "clean_logit": clean_logit, "clean_prob": clean_prob,
                     "clean_rank": int((clean.logits > clean.logits[t]).sum()) + 1,
                     "logit_change": logit - clean_logit, "prob_change": prob - clean_prob, "kl": kl,
                     "top1_id": top_i, "top1_changed": top_i != top_c, "first_flip_layer": first_flip,
                     "lens_ranks": lens.ranks[:, j].tolist(), "clean_lens_ranks": clean_lens.ranks[:, j].tolist()})
    return rows

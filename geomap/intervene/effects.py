"""An outcome as rows: its delta against the clean journey, and its effects on target tokens.

The delta keeps what an intervention can change in a causal model: every position from the first one an edit
touches, with vectors from the first residual boundary it touches (below it a row carries only the norm and the
cosine to the final residual, which moves with the final layer). The effects compare the last position's final
distribution with the clean one, and the logit lens top-1 at the last position layer by layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from geomap.capture.lens import Unembed
from geomap.intervene.engine import Baseline, Outcome


def lens_top1(unembed: Unembed, resid_last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lens top-1 ids and probabilities of (B, d) residuals (one vocabulary GEMM)."""
    logits = unembed.logits(torch.from_numpy(np.ascontiguousarray(resid_last)))
    probs = torch.softmax(logits, dim=-1)
    top = probs.max(dim=-1)
    return top.indices.numpy().astype(np.int32), top.values.numpy().astype(np.float32)


def delta_rows(outcome: Outcome, top1: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray | list]:
    """The delta of one outcome: rows at positions >= first_pos, every boundary (layer-major, then position).

    Args:
        outcome: The intervened run.
        top1: Lens top-1 ids and probabilities at the last position, one per boundary (L+1,).
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
    ids = np.where(last, top1[0][layer_idx], -1).reshape(-1)
    probs = np.where(last, top1[1][layer_idx], np.nan).reshape(-1)
    return {"pos": pos_idx.reshape(-1).astype(np.int32), "layer": layer_idx.reshape(-1).astype(np.int16),
            "norm": norms.reshape(-1).astype(np.float32), "cos_final": cos.reshape(-1).astype(np.float32),
            "vec": vectors, "top1_id": ids, "top1_prob": probs}


def effect_rows(outcome: Outcome, clean: Baseline, targets: Sequence[int],
                clean_top1: np.ndarray, top1: np.ndarray) -> list[dict]:
    """Effects on each target token of one outcome.

    Args:
        outcome: The intervened run.
        clean: The clean run of the same prompt.
        targets: Token ids to report.
        clean_top1: The clean run's lens top-1 at the last position, per boundary (L+1,).
        top1: The intervened run's, per boundary.
    """
    lp_i = torch.log_softmax(torch.from_numpy(outcome.logits).double(), -1)
    lp_c = torch.log_softmax(torch.from_numpy(clean.logits).double(), -1)
    kl = float((lp_c.exp() * (lp_c - lp_i)).sum())
    differs = np.flatnonzero(top1 != clean_top1)
    first_flip = int(differs[0]) if len(differs) else None
    top_i, top_c = int(np.argmax(outcome.logits)), int(np.argmax(clean.logits))
    rows = []
    for t in targets:
        logit, clean_logit = float(outcome.logits[t]), float(clean.logits[t])
        prob, clean_prob = float(lp_i[t].exp()), float(lp_c[t].exp())
        rows.append({"token_id": int(t), "logit": logit, "prob": prob,
                     "rank": int((outcome.logits > outcome.logits[t]).sum()) + 1,
                     "clean_logit": clean_logit, "clean_prob": clean_prob,
                     "clean_rank": int((clean.logits > clean.logits[t]).sum()) + 1,
                     "logit_change": logit - clean_logit, "prob_change": prob - clean_prob, "kl": kl,
                     "top1_id": top_i, "top1_changed": top_i != top_c, "first_flip_layer": first_flip})
    return rows

"""Geometry you can see: the final normed state h̃ against the unembedding vectors of tokens.

The top candidates are set beside a baseline (random tokens and the farthest ones), as cosine and length, with the
top-1 vs top-2 margin.

A logit is u·h̃ (+ bias) = |u| · |h̃| · cos(u, h̃): a token wins by pointing the way h̃ points, by being long, or both.
"""

from __future__ import annotations

import numpy as np

BASELINE = 200  # random vocabulary entries drawn (fixed seed) as the baseline
FAR = 5  # lowest-logit tokens shown


def geometry_payload(weights, normed: np.ndarray, ranked_ids: np.ndarray, low_ids: np.ndarray, texts_for,
                     candidates: int = 8) -> dict:
    """Cosine, |u| and u·h̃ for the top candidates, the farthest tokens and a random baseline.

    Args:
        weights: The model's weight slice (its unembedding rows are read).
        normed: h̃, the final state after the final norm (d,).
        ranked_ids: Token ids by final logit, best first.
        low_ids: The lowest-logit token ids.
        texts_for: A callable from token ids to ``{id: text}``.
        candidates: How many top candidates to show.
    """
    w_u = weights.unembed
    rng = np.random.default_rng(0)
    random_ids = rng.choice(w_u.shape[0], size=min(BASELINE, w_u.shape[0]), replace=False)
    top = [int(t) for t in ranked_ids[:candidates]]
    far = [int(t) for t in low_ids[:FAR]]
    ids = np.asarray(top + far + [int(t) for t in random_ids], np.int64)
    rows = np.asarray(w_u[ids], np.float64)
    h = np.asarray(normed, np.float64)
    h_norm = float(np.linalg.norm(h))
    dots = rows @ h
    norms = np.linalg.norm(rows, axis=1)
    cos = dots / np.maximum(norms * h_norm, 1e-30)
    texts = texts_for(set(top + far))

    def item(i: int) -> dict:
        t = int(ids[i])
        return {"id": t, "token": texts.get(t), "cos": float(cos[i]), "u_norm": float(norms[i]), "dot": float(dots[i])}

    n_top, n_far = len(top), len(far)
    base = slice(n_top + n_far, len(ids))
    u1, u2 = rows[0], rows[1] if n_top > 1 else rows[0]
    return {"h_norm": h_norm, "top": [item(i) for i in range(n_top)],
            "far": [item(i) for i in range(n_top, n_top + n_far)],
            "baseline": {"n": len(random_ids), "cos": [round(float(c), 4) for c in cos[base]],
                         "u_norm": [round(float(v), 3) for v in norms[base]],
                         "cos_mean": float(cos[base].mean()), "cos_sd": float(cos[base].std()),
                         "u_norm_mean": float(norms[base].mean())},
            "margin": float((u1 - u2) @ h),
            "direction_cos": float((u1 - u2) @ h / max(np.linalg.norm(u1 - u2) * h_norm, 1e-30)),
            "direction_norm": float(np.linalg.norm(u1 - u2))}

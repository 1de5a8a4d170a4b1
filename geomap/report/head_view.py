"""Inside any head: the numbers of every (layer, head) at the followed position, compact enough to embed.

For each head: q (norm, top components), raw q·k per key, the scaling factor (1/√d, or the model's own), the scaled
scores, the softmax weights, each key's weighted value ``w·v`` (its norm and its length along the head's output z,
which sum to |z|), and the head's share through W_O (its norm and its length along the layer's attention update).
A causal attention matrix per head covers the captured query positions inside the drawn window.

Long prompts are windowed: the first position (often BOS, an attention sink) and the last `KEY_WINDOW` positions up
to the followed one are drawn; the rest are summarised by their total weight.
"""

from __future__ import annotations

import numpy as np

KEY_WINDOW = 28  # key positions drawn per head (plus position 0); the rest are summed
MATRIX_WINDOW = 24  # query/key positions of the causal matrix
TOP_COMPONENTS = 5


def window(last: int, size: int | None = None) -> list[int]:
    """Positions drawn for a token at ``last``: all when few, else position 0 and the ``size - 1`` nearest.

    ``size`` defaults to `KEY_WINDOW`.
    """
    size = KEY_WINDOW if size is None else size
    if last + 1 <= size:
        return list(range(last + 1))
    return [0] + list(range(last - size + 2, last + 1))


def r5(x) -> float | None:
    """A float rounded to 5 significant digits (compact JSON)."""
    if x is None:
        return None
    x = float(x)
    return None if x != x else float(f"{x:.5g}")


def _top(vec: np.ndarray, k: int = TOP_COMPONENTS) -> list[list]:
    idx = np.argsort(-np.abs(vec))[:k]
    return [[int(i), r5(vec[i])] for i in idx]


def head_payload(attn, keys, attn_update: dict[int, np.ndarray], matrix_rows, tokens, last: int,
                 fallback_scaling: float) -> dict:
    """Every head's inside at position ``last``, keyed ``"layer.head"``, plus the shared key window.

    Args:
        attn: Rows ``(layer, head, scores, weights, entropy, q, k, v, head_out, share_norm, share)`` at ``last``.
        keys: ``{(layer, head, pos): (k, v)}`` for the captured positions.
        attn_update: The layer's whole attention update (d,) by layer.
        matrix_rows: ``{(layer, head): {query_pos: weights}}`` for the causal matrix.
        tokens: The prompt's tokens (dicts with ``pos`` and ``text``) up to ``last``.
        last: The followed position.
        fallback_scaling: 1/√head_dim, used when q·k is 0 at the query's own key.
    """
    shown = window(last)
    mat_pos = window(last, MATRIX_WINDOW)  # read at call time (tests shrink the windows)
    heads = {}
    for layer, head, scores, weights, entropy, q, k_self, _v, head_out, share_norm, share in attn:
        layer, head = int(layer), int(head)
        scores = np.asarray(scores[: last + 1], np.float64)
        weights = np.asarray(weights[: last + 1], np.float64)
        q = np.asarray(q, np.float64)
        z = np.asarray(head_out, np.float64)
        z_norm = float(np.linalg.norm(z))
        own = float(q @ np.asarray(k_self, np.float64))
        scaling = scores[last] / own if abs(own) > 1e-6 else fallback_scaling
        per_key = {"raw": [r5(scores[p] / scaling) for p in shown], "score": [r5(scores[p]) for p in shown],
                   "w": [r5(weights[p]) for p in shown], "kn": [], "vn": [], "cn": [], "ca": []}
        stored = [keys.get((layer, head, p)) for p in shown]
        have = [i for i, s in enumerate(stored) if s is not None]
        kn, vn, cn, ca = ([None] * len(shown) for _ in range(4))
        best = None
        if have:
            k_all = np.asarray([stored[i][0] for i in have], np.float64)
            v_all = np.asarray([stored[i][1] for i in have], np.float64)
            w_have = weights[[shown[i] for i in have]]
            c_all = w_have[:, None] * v_all
            along = c_all @ z / z_norm if z_norm else [None] * len(have)
            for i, k_n, v_n, c_n, c_a in zip(have, np.linalg.norm(k_all, axis=1), np.linalg.norm(v_all, axis=1),
                                             np.linalg.norm(c_all, axis=1), along):
                kn[i], vn[i], cn[i], ca[i] = r5(k_n), r5(v_n), r5(c_n), r5(c_a)
            b = int(np.argmax(w_have))
            best = (shown[have[b]], k_all[b], v_all[b])
        per_key.update(kn=kn, vn=vn, cn=cn, ca=ca)
        update = attn_update.get(layer)
        share = np.asarray(share, np.float64)
        u_norm = float(np.linalg.norm(update)) if update is not None else 0.0
        rest = float(weights.sum() - weights[shown].sum())
        matrix = matrix_rows.get((layer, head), {})
        heads[f"{layer}.{head}"] = {
            "layer": layer, "head": head, "entropy": r5(entropy), "q_norm": r5(np.linalg.norm(q)), "q_top": _top(q),
            "scaling": r5(scaling), "z_norm": r5(z_norm), "share_norm": r5(share_norm),
            "share_along": r5(share @ update / u_norm) if u_norm else None, "update_norm": r5(u_norm),
            "top_key": None if best is None else {"pos": best[0], "k_top": _top(best[1]), "v_top": _top(best[2])},
            "rest_weight": r5(rest), **per_key,
            "matrix": [[int(qp)] + [int(round(1000 * float(matrix[qp][kp]))) for kp in mat_pos if kp <= qp]
                       for qp in mat_pos if qp in matrix],
        }
    return {"keys": shown, "key_tokens": [tokens[p]["text"] for p in shown], "hidden_keys": last + 1 - len(shown),
            "matrix_pos": mat_pos, "matrix_tokens": [tokens[p]["text"] for p in mat_pos], "heads": heads}


def grid(attn, last: int, tokens) -> list[list[dict]]:
    """Layer × head cells: entropy, a head's focus and its weight on position 0.

    The focus is the largest weight on an earlier position other than the first; ``bos`` is the weight on position
    0, where a head parks attention it does not need (the attention sink). At position 0 or 1 no such position
    exists: the focus, its token and its weight are None (the page says so rather than name position 0).
    """
    rows: dict[int, list[dict]] = {}
    for layer, head, _scores, weights, entropy, *_ in attn:
        w = np.asarray(weights[: last + 1], np.float64)
        focus = int(np.argmax(w[1:last])) + 1 if last > 1 else None
        rows.setdefault(int(layer), []).append({"layer": int(layer), "head": int(head), "entropy": r5(entropy),
                                                "focus": focus,
                                                "token": None if focus is None else tokens[focus]["text"],
                                                "focus_weight": None if focus is None else r5(w[focus]),
                                                "bos": r5(w[0])})
    return [rows[k] for k in sorted(rows)]


def chosen_head(attn, last: int) -> tuple[int, int]:
    """The (layer, head) putting the most weight on one earlier non-BOS token at the last position."""
    best, pick = -1.0, (int(attn[0][0]), int(attn[0][1]))
    for layer, head, _, weights, *_ in attn:
        for w in weights[1:last]:
            if w > best:
                best, pick = w, (int(layer), int(head))
    return pick

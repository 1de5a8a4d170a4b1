"""Vectors drawn as colour strips: one cell per dimension, a diverging colour scale, its legend.

The page embeds each strip's stored values (float32's 7 digits, through the JSON block) and `geomap.js` paints them
on a canvas, one cell per dimension: blue below zero, white at zero, red above, the strength scaled to the strip's
98th percentile of |value| (its legend states that scale and the largest value, drawn at full colour). A strip is
drawn from the numbers the store holds, never resampled.
"""

from __future__ import annotations

import numpy as np

WIDTH = 640  # pixels a strip spans at most (a cell is at least one pixel wide)
CLIP = 98  # the colour scale ends at this percentile of |value|


def strip(name: str, label: str, values, note: str = "") -> dict:
    """One strip's payload: ``{name, label, note, d, cell, top, ticks, values}``.

    ``cell`` is the width of one dimension's cell in pixels, ``top`` the colour scale's end: the 98th percentile of
    |value| (a residual's few huge dimensions would otherwise leave every other cell white); larger values are drawn
    at full colour and ``peak`` (the largest |value|) is stated beside the legend. ``ticks``: the legend's values.
    """
    v = np.asarray(values, np.float32).reshape(-1)
    peak = float(np.max(np.abs(v))) if v.size else 0.0
    top = float(np.percentile(np.abs(v), CLIP)) if v.size else 0.0
    top = top if top > 0 else peak
    cell = max(1, WIDTH // max(v.size, 1))
    return {"name": name, "label": label, "note": note, "d": int(v.size), "cell": cell, "top": top, "peak": peak,
            "ticks": [-top, -top / 2, 0.0, top / 2, top], "values": [float(f"{x:.7g}") for x in v.tolist()]}


def page_strips(embed_row, start, q, k, v, resid_in, attn_update, mlp_update, resid_out, where: dict) -> dict:
    """The journey page's strips by name (a missing vector, such as k at an uncaptured key, is left out).

    Args:
        embed_row: The token's row of the embedding matrix (before the model's scale).
        start: The stream's first state (boundary 0).
        q: The opened head's query (post-norm, post-RoPE where the model has them).
        k: That head's key at the position it weighs most.
        v: That head's value there.
        resid_in: The stream entering the opened block.
        attn_update: The block's attention update.
        mlp_update: The block's MLP update.
        resid_out: The stream leaving the block.
        where: ``{layer, head, key_pos}`` for the labels.
    """
    layer, head, key = where["layer"], where["head"], where.get("key_pos")
    parts = [("embed_row", "embedding row E[id]", embed_row, "before the model's embedding scale"),
             ("start", "boundary 0: the stream's first state", start, ""),
             ("q", f"q of block {layer}, head {head}", q, "the stored query"),
             ("k", f"k at position {key}", k, "the key this head weighs most"),
             ("v", f"v at position {key}", v, "its value"),
             ("resid_in", f"boundary {layer}: the stream entering block {layer}", resid_in, ""),
             ("attn_update", f"block {layer}'s attention update", attn_update, ""),
             ("mlp_update", f"block {layer}'s MLP update", mlp_update, ""),
             ("resid_out", f"boundary {layer + 1}: the stream leaving block {layer}", resid_out, "")]
    return {name: strip(name, label, values, note) for name, label, values, note in parts if values is not None}

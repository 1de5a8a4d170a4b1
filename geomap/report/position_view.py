"""Where position enters, from the store and the weight slice (reads only).

RoPE's frequencies per kind of layer and one head's q·k as its key moves away, or learned position vectors'
similarity by distance (GPT-2).
"""

from __future__ import annotations

import numpy as np

from geomap.analysis.position import distance_profile, learned_position_similarity


def rope_payload(weights, n_layers: int) -> dict:
    """Per kind of rotation (one per layer type), its pairs, base and frequency range, and the layers using it."""
    ropes: dict[str, dict] = {}
    for ell in range(n_layers):
        rope = weights.rope(ell)
        if rope is None:
            continue
        name, inv_freq, _, _ = rope
        entry = ropes.setdefault(name, {"pairs": len(inv_freq), "inv_freq_first": float(inv_freq[0]),
                                        "inv_freq_last": float(inv_freq[-1]),
                                        "base": weights.meta["architecture"]["ropes"][ell]["base"], "layers": []})
        entry["layers"].append(ell)
    return ropes


def profile(weights, head_qk: dict | None, max_distance: int = 32) -> list[dict]:
    """One head's scaled q·k for Δ = 0..max_distance, its captured q and k moved apart by RoPE.

    Args:
        weights: The weight slice.
        head_qk: ``{layer, head, q_pos, q, key_pos, k, captured}`` (`geomap.analysis.journey_reads.head_qk`).
        max_distance: The largest distance drawn.
    """
    if head_qk is None:
        return []
    rope = weights.rope(head_qk["layer"])
    if rope is None:
        return []
    _, inv_freq, attention_scaling, scaling = rope
    values = distance_profile(np.asarray(head_qk["q"]), np.asarray(head_qk["k"]), head_qk["q_pos"],
                              head_qk["key_pos"], inv_freq, scaling, max_distance, attention_scaling)
    real = head_qk["q_pos"] - head_qk["key_pos"]
    return [{"distance": dist, "score": float(v), "key_pos": head_qk["key_pos"],
             "captured": float(head_qk["captured"]) if dist == real else None} for dist, v in enumerate(values)]


def learned(weights, max_distance: int = 32) -> list[dict]:
    """Learned position vectors: their mean cosine by distance."""
    vectors = weights.array("pos_embed")
    if vectors is None:
        return []
    _, sims = learned_position_similarity(np.asarray(vectors, np.float32), max_distance)
    return [{"distance": dist, "mean_cosine": float(v)} for dist, v in enumerate(sims)]

"""How position enters the model: RoPE's rotations and their effect on q·k, or learned position vectors.

RoPE rotates each pair of dimensions ``(i, i + head_dim/2)`` of q and k by ``pos × inv_freq[i]``. A rotation
by a and one by b leave ``R(a)q · R(b)k = R(a − b)q · k``, so a score depends on the query and key contents
and on their distance only. `distance_profile` undoes the rotations of a captured query and key, then
re-applies them as if the key sat Δ positions before the query, for Δ = 0..max: the same two vectors, moved.
At the key's real distance the profile reproduces the captured score. Models whose rotary embedding also
scales cos and sin (``attention_scaling`` ≠ 1, e.g. YaRN) are handled as pure rotations times that factor.
"""

from __future__ import annotations

import numpy as np


def rope_angles(inv_freq: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(P, head_dim/2) angles in radians: ``pos × inv_freq`` (computed in float32, as transformers does)."""
    pos = np.asarray(positions, dtype=np.float32)[:, None]
    return (pos * np.asarray(inv_freq, dtype=np.float32)[None, :]).astype(np.float64)


def rotate(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Apply RoPE's rotation (the ``rotate_half`` layout) by ``angles`` (..., head_dim/2) to ``x`` (..., head_dim)."""
    x = np.asarray(x, dtype=np.float64)
    half = x.shape[-1] // 2
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def distance_profile(q: np.ndarray, k: np.ndarray, q_pos: int, k_pos: int, inv_freq: np.ndarray, scaling: float,
                     max_distance: int, attention_scaling: float = 1.0) -> np.ndarray:
    """Scaled q·k for Δ = 0..max_distance, with the captured (post-RoPE) q and k moved Δ apart.

    Args:
        q: (head_dim,) post-RoPE query, captured at ``q_pos``.
        k: (head_dim,) post-RoPE key, captured at ``k_pos``.
        q_pos: The query's position.
        k_pos: The key's position.
        inv_freq: (head_dim/2,) the layer's RoPE frequencies.
        scaling: The attention's score scaling (1/sqrt(head_dim) unless the model sets another).
        max_distance: Largest Δ.
        attention_scaling: RoPE's cos/sin factor (1 for plain RoPE).

    Returns:
        (max_distance + 1,) scores, index Δ.
    """
    f = np.asarray(inv_freq, dtype=np.float32)
    q0 = rotate(q, -rope_angles(f, np.array([q_pos]))[0]) / attention_scaling
    k0 = rotate(k, -rope_angles(f, np.array([k_pos]))[0]) / attention_scaling
    deltas = np.arange(max_distance + 1)
    moved = rotate(np.broadcast_to(q0, (len(deltas), len(q0))), rope_angles(f, deltas))
    return (moved @ k0) * scaling * attention_scaling**2


def learned_position_similarity(vectors: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Norms (P,) of learned position vectors, and their mean cosine by distance (max_distance + 1,)."""
    x = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    unit = x / np.maximum(norms[:, None], 1e-30)
    sims = [float(np.mean(np.sum(unit[dist:] * unit[: len(unit) - dist], axis=1)))
            for dist in range(min(max_distance, len(x) - 1) + 1)]
    return norms, np.asarray(sims)

"""Unembedding geometry of a residual state: how the state, as the unembedding sees it, lines up with tokens.

A logit is an inner product: ``logit_t = u_t · h̃ + b_t``, where ``h̃`` is the state after the model's own
final norm, ``u_t`` the unembedding row of token t and ``b_t`` its bias (0 on most models). So the top-1 vs
top-2 margin is ``(u₁ − u₂)·h̃ + (b₁ − b₂)``: a direction in the residual space and how far the state reaches
along it. The nearest vocabulary directions by FAISS inner product are therefore the top logits (without bias).
Logits here are before any final soft cap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from geomap.models.loading import LoadedModel


@dataclass(frozen=True)
class TokenAlignment:
    """Tokens compared with one state. Arrays are (n,), in the order given."""

    token_ids: np.ndarray
    dot: np.ndarray
    cosine: np.ndarray


@dataclass(frozen=True)
class Geometry:
    """The unembedding geometry of one state.

    Attributes:
        normed: (d,) the state after the final norm (h̃).
        candidates: The state's own top logits.
        contrast: Tokens the caller named.
        nearest: Nearest unembedding directions by FAISS inner product (they must equal the top logits).
        embedding: For layer 0, the nearest rows of the input embedding by cosine with the raw state, else None.
        top1_id, top2_id, margin, direction_dot, bias_diff: ``margin = direction_dot + bias_diff``.
    """

    normed: np.ndarray
    candidates: TokenAlignment
    contrast: TokenAlignment
    nearest: TokenAlignment
    embedding: TokenAlignment | None
    top1_id: int
    top2_id: int
    margin: float
    direction_dot: float
    bias_diff: float


def normed_states(loaded: LoadedModel, x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """States (n, d) after the model's own final norm (what the unembedding reads), in chunks.

    ``loaded`` may also be a weight slice (`geomap.analysis.weights.Weights`): the same norm, without the model.
    """
    if hasattr(loaded, "normed"):
        return loaded.normed(x)
    norm = loaded.anatomy.final_norm
    x = np.asarray(x, np.float32)
    out = np.empty_like(x)
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            part = torch.as_tensor(x[start:start + chunk]).to(norm.weight.device, norm.weight.dtype)
            out[start:start + chunk] = norm(part).float().cpu().numpy()
    return out


def unembed_rows(loaded, ids=None) -> np.ndarray:
    """Unembedding rows (all, or of ``ids``) as float32 numpy, from a model or a weight slice."""
    if hasattr(loaded, "unembed_rows"):
        return np.asarray(loaded.unembed, np.float32) if ids is None else loaded.unembed_rows(ids)
    w = loaded.anatomy.unembed.weight
    return (w if ids is None else w[list(ids)]).detach().float().cpu().numpy()


def normed_state(loaded: LoadedModel, state: np.ndarray) -> np.ndarray:
    """One state (d,) after the model's own final norm."""
    return normed_states(loaded, np.asarray(state, np.float32)[None])[0]


def _align(matrix: np.ndarray, ids: np.ndarray, x: np.ndarray) -> TokenAlignment:
    rows = matrix[ids].astype(np.float64)
    dot = rows @ x.astype(np.float64)
    cosine = dot / np.maximum(np.linalg.norm(rows, axis=1) * np.linalg.norm(x), 1e-30)
    return TokenAlignment(np.asarray(ids, np.int64), dot.astype(np.float32), cosine.astype(np.float32))


def unembedding_geometry(loaded: LoadedModel, state: np.ndarray, layer: int, contrast_ids=(),
                         k: int = 10) -> Geometry:
    """Compare a raw residual ``state`` (d,) at boundary ``layer`` with the vocabulary.

    Args:
        loaded: The model whose unembedding (and final norm) is used.
        state: The raw residual.
        layer: Its boundary (0 adds the input-embedding neighbours).
        contrast_ids: Extra token ids to compare (for example " banana").
        k: Candidates, nearest directions and embedding neighbours to keep.
    """
    from geomap.paths import cache_home
    from geomap.store.vocab_index import vocab_index

    a = loaded.anatomy
    w_u = a.unembed.weight.detach().float().cpu().numpy()
    bias = a.unembed_bias
    b = bias.detach().float().cpu().numpy() if bias is not None else np.zeros(len(w_u), np.float32)
    h = normed_state(loaded, state)
    logits = w_u @ h + b
    top = np.argsort(-logits, kind="stable")[:k]
    index = vocab_index(w_u, loaded.weights_hash, "unembed", cache_home() / "faiss")
    scores, found = index.search(h[None].astype(np.float32), k)
    nearest = _align(w_u, found[0], h)
    nearest = TokenAlignment(nearest.token_ids, scores[0].astype(np.float32), nearest.cosine)
    embedding = None
    if layer == 0:
        w_e = a.embed.weight.detach().float().cpu().numpy()
        cos = (w_e @ state) / np.maximum(np.linalg.norm(w_e, axis=1) * np.linalg.norm(state), 1e-30)
        embedding = _align(w_e, np.argsort(-cos, kind="stable")[:k], np.asarray(state, np.float32))
    t1, t2 = int(top[0]), int(top[1])
    direction = float((w_u[t1].astype(np.float64) - w_u[t2]) @ h)
    return Geometry(h, _align(w_u, top, h), _align(w_u, np.asarray(list(contrast_ids), np.int64), h), nearest,
                    embedding, t1, t2, float(logits[t1] - logits[t2]), direction, float(b[t1] - b[t2]))

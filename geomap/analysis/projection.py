"""2-D maps of stored states: PCA, UMAP and t-SNE, with unembedding directions drawn in the same space.

What is projected, and why:
    Raw residuals are dominated by a few huge dimensions (Gemma-3 has components in the tens of thousands), so
    a map of raw states mostly shows those. geomap projects the states **after the model's own final norm**
    (``space = "normed"``): the vectors the unembedding reads, on one scale at every layer, so one basis can hold
    a token's whole path through the layers (``joint``), or each layer gets its own fit.

Unembedding directions:
    A token's unembedding row ``u`` is a direction, not a state: it is drawn as ``u/|u|`` scaled to the median
    length of the fitted states (``token_scale``), then projected like a state, so it lands among them and its
    angle from the origin of the map is meaningful for PCA.

Placing other states:
    PCA is stored as its mean and basis, so any journey (and any unembedding direction) is placed exactly. UMAP
    and t-SNE models are not stored (that would take pickle); a new state or direction is placed at the
    inverse-distance-weighted mean of its 10 nearest fitted states, an approximation. UMAP runs on an exact
    FAISS k-nearest-neighbour graph.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

METHODS = ("pca", "umap", "tsne")
TSNE_MAX = 10_000


@dataclass(frozen=True)
class Projection:
    """A fitted 2-D map.

    Attributes:
        method: ``pca``, ``umap`` or ``tsne``.
        coords: (n, 2) coordinates of the fitted states (all of them; t-SNE above `TSNE_MAX` states is fitted on
            a subsample and the rest are placed by nearest neighbours).
        token_coords: (m, 2) coordinates of the scaled unembedding directions given.
        token_scale: Length given to the unembedding directions.
        params: The fit's settings.
        center, components, explained: PCA's mean (d,), basis (2, d) and explained variance ratios (2,).
    """

    method: str
    coords: np.ndarray
    token_coords: np.ndarray
    token_scale: float
    params: dict = field(default_factory=dict)
    center: np.ndarray | None = None
    components: np.ndarray | None = None
    explained: np.ndarray | None = None


def fit_projection(x: np.ndarray, method: str = "pca", directions: np.ndarray | None = None, seed: int = 0,
                   n_neighbors: int = 15, min_dist: float = 0.1) -> Projection:
    """Fit a 2-D map of states ``x`` (n, d) and place unembedding ``directions`` (m, d) in it.

    Raises:
        ValueError: Unknown method, or fewer than 3 states.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown projection method {method!r}; use one of {', '.join(METHODS)}.")
    x = np.asarray(x, dtype=np.float32)
    if len(x) < 3:
        raise ValueError(f"A map needs at least 3 states; got {len(x)}.")
    directions = np.zeros((0, x.shape[1]), np.float32) if directions is None else np.asarray(directions, np.float32)
    scale = float(np.median(np.linalg.norm(x, axis=1)))
    tokens = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-30) * scale
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed).fit(x)
        return Projection("pca", pca.transform(x).astype(np.float32), pca.transform(tokens).astype(np.float32)
                          if len(tokens) else np.zeros((0, 2), np.float32), scale, {"seed": seed},
                          pca.mean_.astype(np.float32), pca.components_.astype(np.float32),
                          pca.explained_variance_ratio_.astype(np.float32))
    if method == "umap":
        return _umap(x, tokens, scale, seed, n_neighbors, min_dist)
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    fit_idx = np.sort(rng.choice(len(x), TSNE_MAX, replace=False)) if len(x) > TSNE_MAX else np.arange(len(x))
    perplexity = float(min(30.0, max(2.0, (len(fit_idx) - 1) / 3)))
    fitted = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(x[fit_idx])
    coords = np.zeros((len(x), 2), np.float32)
    coords[fit_idx] = fitted
    rest = np.setdiff1d(np.arange(len(x)), fit_idx)
    if len(rest):
        coords[rest] = place_by_neighbours(x[fit_idx], coords[fit_idx], x[rest])
    token_coords = place_by_neighbours(x[fit_idx], coords[fit_idx], tokens) if len(tokens) else np.zeros((0, 2))
    return Projection("tsne", coords, token_coords.astype(np.float32), scale,
                      {"seed": seed, "perplexity": perplexity, "fitted_on": int(len(fit_idx))})


def _umap(x: np.ndarray, tokens: np.ndarray, scale: float, seed: int, n_neighbors: int,
          min_dist: float) -> Projection:
    """UMAP on an exact FAISS k-nearest-neighbour graph (no approximate NN-descent, and no JIT for it)."""
    import os

    import faiss

    from geomap.paths import cache_home

    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_home() / "numba"))  # compiled kernels persist across runs
    import umap

    neighbours = max(2, min(n_neighbors, len(x) - 1))
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(x))
    dist, idx = index.search(np.ascontiguousarray(x), neighbours)
    model = umap.UMAP(n_components=2, n_neighbors=neighbours, min_dist=min_dist, random_state=seed, n_jobs=1,
                      precomputed_knn=(idx, np.sqrt(np.maximum(dist, 0)), None),
                      init="spectral" if len(x) > neighbours + 2 else "random")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        coords = model.fit_transform(x).astype(np.float32)
    token_coords = place_by_neighbours(x, coords, tokens) if len(tokens) else np.zeros((0, 2), np.float32)
    return Projection("umap", coords, token_coords, scale,
                      {"seed": seed, "n_neighbors": neighbours, "min_dist": min_dist, "knn": "exact (FAISS)"})


def place_by_neighbours(fitted_x: np.ndarray, fitted_coords: np.ndarray, x: np.ndarray, k: int = 10) -> np.ndarray:
    """Coordinates for new states: the inverse-distance-weighted mean of their k nearest fitted states."""
    import faiss

    k = min(k, len(fitted_x))
    index = faiss.IndexFlatL2(fitted_x.shape[1])
    index.add(np.ascontiguousarray(fitted_x, dtype=np.float32))
    dist, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), k)
    weights = 1.0 / np.maximum(np.sqrt(np.maximum(dist, 0)), 1e-6)
    weights /= weights.sum(axis=1, keepdims=True)
    return (fitted_coords[idx] * weights[..., None]).sum(axis=1).astype(np.float32)


def place_pca(x: np.ndarray, center: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Exact placement of states (n, d) into a stored PCA basis."""
    return ((np.asarray(x, np.float32) - center) @ np.asarray(components, np.float32).T).astype(np.float32)

"""Fit, store and read back 2-D maps of a run's states (the API behind `geomap project`)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from geomap.analysis import load
from geomap.analysis.geometry import normed_states, unembed_rows
from geomap.analysis.persist import insert_rows, next_id
from geomap.analysis.projection import fit_projection
from geomap.store.db import NotFoundError, StoreError, ensure_schema, in_transaction
from geomap.store.handle import Store, StoreLike


def run_model(con, run_id: int, loaded=None):
    """The model a run was captured with (``loaded`` if its weights match)."""
    from geomap.analysis.api import model_for

    rows = con.execute("SELECT id FROM prompts WHERE run_id = ? AND status = 'done' ORDER BY id LIMIT 1",
                       [run_id]).fetchall()
    if not rows:
        raise StoreError(f"Run {run_id} has no stored prompts; list runs with `geomap sql \"SELECT * FROM runs\"`.")
    return model_for(load.prompt_info(con, rows[0][0]), loaded)


def top_candidates(con, run_id: int, limit: int = 12) -> list[int]:
    """The run's most frequent final top-1 tokens at the prompts' last positions."""
    rows = con.execute("""SELECT n.token_ids[1] AS t, count(*) AS c
                          FROM next_token n JOIN prompts p ON p.id = n.prompt_id
                          WHERE p.run_id = ? AND n.pos = p.n_tokens - 1 GROUP BY t ORDER BY c DESC, t LIMIT ?""",
                       [run_id, limit]).fetchall()
    return [int(r[0]) for r in rows]


def project(store: StoreLike, run_id: int, method: str = "pca", layers: list[int] | None = None,
            joint: bool = True, seed: int = 0, loaded=None) -> pd.DataFrame:
    """Fit 2-D maps of a run's states after the final norm, and store them.

    Results go to ``projections``, ``projection_points`` and ``projection_tokens``.

    Args:
        store: The store (a path opens one for the call).
        run_id: The run whose states are mapped.
        method: ``pca``, ``umap`` or ``tsne``.
        layers: Boundaries to include (default all).
        joint: One basis across all ``layers`` (a token's path is a polyline in it), else one fit per layer.
        seed: Random state of the fit.
        loaded: The model (loaded by name from the run when None).

    Returns:
        One row per fit: ``projection_id, layer (None when joint), n_points, explained`` (PCA).
    """
    with Store.use(store, "w") as opened, opened.writer() as con:
        ensure_schema(con)
        loaded = run_model(con, run_id, loaded)
        states = load.run_states(con, run_id, layers)
        x = normed_states(loaded, states.x)
        token_ids = top_candidates(con, run_id)
        w_u = unembed_rows(loaded)
        groups = [(None, np.arange(len(x)))] if joint else [
            (int(ell), np.flatnonzero(states.layers == ell)) for ell in np.unique(states.layers)]
        chosen = sorted({int(v) for v in np.unique(states.layers)})
        out = []
        for layer, idx in groups:
            fit = fit_projection(x[idx], method, w_u[token_ids], seed=seed)
            with in_transaction(con):
                pid = next_id(con, "projections")
                insert_rows(con, "projections", [{
                    "id": pid, "run_id": run_id, "method": method, "space": "normed", "layers": chosen,
                    "joint": joint, "layer": layer, "params": json.dumps(fit.params), "n_points": int(len(idx)),
                    "center": None if fit.center is None else fit.center.tolist(),
                    "components": None if fit.components is None else fit.components.tolist(),
                    "explained": None if fit.explained is None else fit.explained.tolist(),
                    "token_scale": fit.token_scale}])
                _insert_points(con, pid, states, idx, fit.coords)
                insert_rows(con, "projection_tokens", [
                    {"projection_id": pid, "token_id": t, "x": float(c[0]), "y": float(c[1])}
                    for t, c in zip(token_ids, fit.token_coords)])
            out.append({"projection_id": pid, "layer": layer, "n_points": int(len(idx)),
                        "explained": None if fit.explained is None else [float(v) for v in fit.explained]})
    frame = pd.DataFrame(out)
    frame.attrs.update(run_id=run_id, method=method, joint=joint, layers=chosen, tokens=token_ids)
    return frame


def _insert_points(con, projection_id: int, states: load.StateSet, idx: np.ndarray, coords: np.ndarray) -> None:
    import pyarrow as pa

    table = pa.table({"projection_id": pa.array(np.full(len(idx), projection_id, np.int32)),
                      "state_id": pa.array(states.ids[idx]),
                      "prompt_id": pa.array(states.prompt_ids[idx].astype(np.int32)),
                      "pos": pa.array(states.pos[idx].astype(np.int32)),
                      "layer": pa.array(states.layers[idx].astype(np.int16)),
                      "x": pa.array(coords[:, 0].astype(np.float32)), "y": pa.array(coords[:, 1].astype(np.float32))})
    con.register("_points", table)
    try:
        con.execute("INSERT INTO projection_points SELECT * FROM _points")
    finally:
        con.unregister("_points")


def place(store: StoreLike, projection_id: int, prompt_id: int, loaded=None,
          tokens: list[int] | None = None, positions: list[int] | None = None) -> pd.DataFrame:
    """Place a stored journey (any run, same model) into a fitted map.

    PCA places it exactly with the stored mean and basis; UMAP and t-SNE place each state at the
    inverse-distance-weighted mean of its 10 nearest fitted states (their fitted models are not stored).

    Args:
        store: The store (a path opens one for the call).
        projection_id: A fitted map (``projections.id``).
        prompt_id: The journey to place.
        loaded: The model (loaded by name from the run when None).
        tokens: Token ids whose unembedding directions are placed too, scaled like the map's own.
        positions: The positions to place (default all of the prompt's).

    Returns:
        Rows ``pos, layer, x, y`` for the prompt's states at the map's layers; ``attrs`` holds ``exact`` and
        ``tokens`` (a frame ``token_id, x, y``).
    """
    from geomap.analysis.projection import place_by_neighbours, place_pca

    with Store.use(store, "w") as opened, opened.writer() as con:
        rows = con.execute("SELECT run_id, method, layers, joint, layer, center, components, token_scale "
                           "FROM projections WHERE id = ?", [projection_id]).fetchall()
        if not rows:
            raise NotFoundError(f"No projection with id {projection_id}.")
        run_id, method, layers, joint, layer, center, components, token_scale = rows[0]
        loaded = run_model(con, run_id, loaded)
        info = load.prompt_info(con, prompt_id)
        if info.weights_sha256 != loaded.weights_hash:
            raise StoreError(f"Prompt {prompt_id} was captured with other weights than projection {projection_id}.")
        wanted = list(layers) if joint else [layer]
        where = range(info.n_tokens) if positions is None else positions
        vecs = [(p, ell, load.state(con, prompt_id, ell, p)) for ell in wanted for p in where]
        x = normed_states(loaded, np.stack([v for _, _, v in vecs]))
        token_ids = [int(t) for t in tokens or []]
        w_u = unembed_rows(loaded, token_ids)
        dirs = w_u / np.maximum(np.linalg.norm(w_u, axis=1, keepdims=True), 1e-30) * float(token_scale or 1.0)
        if method == "pca":
            basis = np.asarray(center, np.float32), np.asarray(components, np.float32)
            coords, token_coords = place_pca(x, *basis), place_pca(dirs, *basis)
        else:
            fitted = con.execute("SELECT state_id, x, y FROM projection_points WHERE projection_id = ? "
                                 "ORDER BY state_id", [projection_id]).fetchnumpy()
            ids = fitted["state_id"].astype(np.int64)
            fit_states = load.run_states(con, run_id, wanted)
            order = np.searchsorted(fit_states.ids, ids)
            fit_x = normed_states(loaded, fit_states.x[order])
            fit_xy = np.stack([fitted["x"], fitted["y"]], 1).astype(np.float32)
            coords = place_by_neighbours(fit_x, fit_xy, x)
            token_coords = place_by_neighbours(fit_x, fit_xy, dirs) if token_ids else np.zeros((0, 2), np.float32)
    frame = pd.DataFrame({"pos": [p for p, _, _ in vecs], "layer": [ell for _, ell, _ in vecs],
                          "x": coords[:, 0], "y": coords[:, 1]})
    frame.attrs.update(exact=method == "pca", projection_id=projection_id, prompt_id=prompt_id,
                       tokens=pd.DataFrame({"token_id": token_ids, "x": token_coords[:, 0], "y": token_coords[:, 1]}))
    return frame

"""Position (RoPE and learned), projections and trajectory statistics, on tiny models and the real one."""

from __future__ import annotations

import numpy as np
import pytest

from geomap.analysis.api import trajectory_stats
from geomap.analysis.maps import project
from geomap.analysis.position import rope_angles, rotate
from geomap.analysis.positions_api import position
from geomap.capture import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.store.writer import PromptSpec
from tests.storedb import rows

PROMPTS = ["The storm is coming over the hills", "Paris is the capital of France", "def add(a, b):",
           "Once upon a time there was", "The market is"]
ALL = CaptureConfig(attn_positions="all", lens_positions="all")


@pytest.fixture(params=["llama", "gemma3_text", "gpt2", pytest.param("real", marks=pytest.mark.real)],
                scope="module")
def stored(request, tiny_models, tmp_path_factory):
    model = request.getfixturevalue("real") if request.param == "real" else tiny_models[request.param]
    db = tmp_path_factory.mktemp(f"pos-{request.param}") / "p.duckdb"
    ingest(model, [PromptSpec(t) for t in PROMPTS], db, ALL, progress=False)
    return model, db


def test_rotation_is_a_rotation():
    rng = np.random.default_rng(0)
    x, f = rng.normal(size=16), 1.0 / (10000 ** (np.arange(8) / 8))
    a, b = rope_angles(f, np.array([7]))[0], rope_angles(f, np.array([3]))[0]
    assert np.linalg.norm(rotate(x, a)) == pytest.approx(np.linalg.norm(x))
    np.testing.assert_allclose(rotate(rotate(x, a), -a), x, atol=1e-12)
    y = rng.normal(size=16)  # R(a)x · R(b)y depends on a - b only
    assert rotate(x, a) @ rotate(y, b) == pytest.approx(rotate(x, a - b) @ y)


def test_position_profile_reproduces_the_captured_scores(stored):
    model, db = stored
    frame = position(db, 1, max_distance=12, loaded=model)
    if model.anatomy.rope(0) is None:  # learned positions
        assert frame.attrs["kind"] == "learned" and frame["mean_cosine"].iloc[0] == pytest.approx(1.0)
        assert rows(db, "SELECT count(*) FROM position_vectors")[0][0] == frame.attrs["positions"]
        return
    checked = frame.dropna(subset=["captured"])
    a = model.anatomy
    assert len(checked) == a.n_layers * a.n_heads  # one real distance per head
    np.testing.assert_allclose(checked["score"], checked["captured"], rtol=1e-4, atol=1e-4)
    n_tokens = rows(db, "SELECT n_tokens FROM prompts WHERE id = 1")[0][0]
    pairs = a.head_dim // 2
    kinds = len(frame.attrs["ropes"])
    assert rows(db, "SELECT count(*) FROM rope_angles WHERE prompt_id = 1")[0][0] == kinds * n_tokens * pairs
    assert rows(db, "SELECT count(*) FROM position_scores WHERE prompt_id = 1")[0][0] == len(frame)
    angle = rows(db, "SELECT angle FROM rope_angles WHERE prompt_id = 1 AND pos = 3 AND pair = 1 LIMIT 1")[0][0]
    name, inv_freq, _ = a.rope(0)
    assert angle == pytest.approx(3 * float(inv_freq[1]), rel=1e-6)


def test_pca_projection_is_stored_and_exact(stored):
    model, db = stored
    frame = project(db, 1, "pca", loaded=model)
    (pid,) = frame["projection_id"]
    a = model.anatomy
    n_states = rows(db, "SELECT count(*) FROM states")[0][0]
    assert frame["n_points"].iloc[0] == n_states == rows(
        db, "SELECT count(*) FROM projection_points WHERE projection_id = ?", pid)[0][0]
    center, comps, explained = rows(db, "SELECT center, components, explained FROM projections WHERE id = ?", pid)[0]
    comps = np.asarray(comps)
    np.testing.assert_allclose(comps @ comps.T, np.eye(2), atol=1e-5)
    assert 0 < sum(explained) <= 1
    # A stored point is the normed state placed in the stored basis.
    sid, x, y = rows(db, "SELECT state_id, x, y FROM projection_points WHERE projection_id = ? LIMIT 1 OFFSET 5",
                      pid)[0]
    vec = np.asarray(rows(db, "SELECT vec FROM states WHERE id = ?", sid)[0][0], np.float32)
    from geomap.analysis.geometry import normed_state

    placed = (normed_state(model, vec) - np.asarray(center)) @ comps.T
    np.testing.assert_allclose(placed, [x, y], rtol=1e-3, atol=1e-3)
    assert rows(db, "SELECT count(*) FROM projection_tokens WHERE projection_id = ?", pid)[0][0] >= 1
    per_layer = project(db, 1, "pca", joint=False, loaded=model)
    assert per_layer["layer"].tolist() == list(range(a.n_layers + 1))


def test_umap_and_tsne_maps(tiny_models, tmp_path):
    model, db = tiny_models["llama"], tmp_path / "m.duckdb"
    ingest(model, [PromptSpec(t) for t in PROMPTS], db, ALL, progress=False)
    for method in ("umap", "tsne"):
        frame = project(db, 1, method, layers=[0, 1, 2], loaded=model)
        pid = int(frame["projection_id"].iloc[0])
        coords = np.asarray(rows(db, "SELECT x, y FROM projection_points WHERE projection_id = ?", pid))
        assert len(coords) == frame["n_points"].iloc[0] and np.isfinite(coords).all() and coords.std(0).min() > 0


def test_trajectory_statistics_agree_with_the_lens(stored):
    model, db = stored
    frame = trajectory_stats(db, 1)
    a = model.anatomy
    assert frame["layer"].tolist() == list(range(a.n_layers + 1))
    last = frame.iloc[-1]
    assert last["final_rank"] == 1 and last["kl_to_final"] == pytest.approx(0, abs=1e-5)
    assert last["top1_id"] == frame.attrs["final"]["id"]
    depth = frame.attrs["prediction_depth"]
    agree = (frame["top1_id"] == frame.attrs["final"]["id"]).to_numpy()
    assert agree[depth:].all() and (depth == 0 or not agree[depth - 1])
    norms = frame["norm"].to_numpy()
    np.testing.assert_allclose(frame["norm_growth"].to_numpy()[1:], norms[1:] / norms[:-1], rtol=1e-5)
    assert (frame["lens_margin"] >= 0).all()
    heads = rows(db, "SELECT to_previous, to_first, to_self, entropy FROM head_stats WHERE prompt_id = 1")
    assert len(heads) == a.n_layers * a.n_heads
    assert all(0 <= v <= 1 for row in heads for v in row[:3]) and all(row[3] >= 0 for row in heads)


def test_a_journey_is_placed_into_a_fitted_map(stored):
    from geomap.analysis.maps import place

    model, db = stored
    frame = project(db, 1, "pca", layers=[0, 2], loaded=model)
    pid = int(frame["projection_id"].iloc[0])
    placed = place(db, pid, 2, loaded=model)
    assert placed.attrs["exact"] and len(placed) == 2 * rows(db, "SELECT n_tokens FROM prompts WHERE id = 2")[0][0]
    stored_xy = rows(db, """SELECT p.x, p.y FROM projection_points p WHERE projection_id = ? AND prompt_id = 2
                             ORDER BY layer, pos""", pid)
    np.testing.assert_allclose(placed[["x", "y"]].to_numpy(), np.asarray(stored_xy), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["pca", "umap"])
def test_unembedding_directions_are_placed_like_the_fitted_ones(stored, method):
    """Placing a map's own token directions again reproduces the coordinates stored when it was fitted."""
    from geomap.analysis.maps import place

    model, db = stored
    pid = int(project(db, 1, method, loaded=model)["projection_id"].iloc[0])
    fitted = rows(db, "SELECT token_id, x, y FROM projection_tokens WHERE projection_id = ? ORDER BY token_id", pid)
    assert fitted
    placed = place(db, pid, 2, loaded=model, tokens=[r[0] for r in fitted]).attrs["tokens"]
    assert placed["token_id"].tolist() == [r[0] for r in fitted]
    np.testing.assert_allclose(placed[["x", "y"]].to_numpy(), np.asarray([r[1:] for r in fitted]), rtol=1e-3,
                               atol=1e-3)

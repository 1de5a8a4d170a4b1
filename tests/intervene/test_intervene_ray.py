"""A sweep on Ray: its batches spread over two local workers store what the inline sweep stores; a killed driver
resumes with one rerun of the same command."""

from __future__ import annotations

import os
import subprocess
import sys

import duckdb
import numpy as np
import pytest

from geomap.faults import ENV as KILL_ENV

ray = pytest.importorskip("ray")

TEXT, OTHER = "The storm is coming over the hills", "The storm is moving over the hills"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _geomap(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geomap", *args], capture_output=True, text=True, timeout=600,
                          env={**ENV, **(env or {})})


def _stored(db) -> dict:
    con = duckdb.connect(str(db), read_only=True)
    try:
        q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
        return {"ledger": q("SELECT id, key, run_id, prompt_id, layer, positions, first_layer, first_pos "
                            "FROM interventions ORDER BY id"),
                "runs": q("SELECT id, status, pipeline FROM runs ORDER BY id"),
                "delta": q("SELECT intervention_id, pos, layer, norm, cos_final, vec, top1_id, top1_prob "
                           "FROM intervention_states ORDER BY intervention_id, pos, layer"),
                "effects": q("SELECT intervention_id, token_id, logit, prob, rank, kl, top1_id, first_flip_layer, "
                             "lens_ranks, clean_lens_ranks FROM effects ORDER BY intervention_id, token_id")}
    finally:
        con.close()


def _assert_same(got: dict, want: dict) -> None:
    """Same ledger, runs and ids; the measured numbers equal to float32 rounding (another process computed them)."""
    assert got["ledger"] == want["ledger"] and got["runs"] == want["runs"]
    for table in ("delta", "effects"):
        assert len(got[table]) == len(want[table]) > 0
        for a, b in zip(got[table], want[table]):
            for x, y in zip(a, b):
                if isinstance(x, float) or (isinstance(x, list) and x and isinstance(x[0], float)):
                    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-4,
                                               atol=1e-5)
                else:
                    assert x == y, (table, a[:3], x, y)


def test_a_ray_sweep_stores_what_the_inline_sweep_stores(tiny_models, tmp_path):
    from geomap.ingest.engine_config import EngineConfig
    from geomap.ingest.interventions import sweep
    from geomap.intervene import Noise, Site, Spec

    loaded = tiny_models["llama"]
    n_bounds = loaded.anatomy.n_layers + 1
    specs = [*[Spec("trace", TEXT, Site("resid", layer), (pos,), noise=Noise((1, 2), 3.0, 5))
               for layer in range(n_bounds) for pos in (-1, 2)],
             *[Spec("patch", TEXT, Site("mlp", layer), (-1,), source=OTHER) for layer in range(n_bounds - 1)]]
    inline, on_ray = tmp_path / "inline.duckdb", tmp_path / "ray.duckdb"
    want = sweep(loaded, specs, inline, targets=[" the", " over"], name="s", batch_size=4)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        got = sweep(loaded, specs, on_ray, targets=[" the", " over"], name="s", batch_size=4,
                    engine=EngineConfig(kind="ray", workers=2))
        again = sweep(loaded, specs, on_ray, targets=[" the", " over"], name="s", batch_size=4,
                      engine=EngineConfig(kind="ray", workers=2))
    finally:
        ray.shutdown()
    assert got.ids == want.ids and got.stored == len(specs) and again.stored == 0
    _assert_same(_stored(on_ray), _stored(inline))


@pytest.mark.parametrize("point", ["intervene.batch_committed@2"])
def test_a_killed_ray_driver_resumes_with_one_rerun(tiny_dirs, tmp_path, point):
    args = ["intervene", "patch", TEXT, "--source", OTHER, "--layer", "all", "--pos", "-3:", "--model",
            str(tiny_dirs["llama"]), "--batch-size", "3", "--name", "k"]
    reference, db = tmp_path / "inline.duckdb", tmp_path / "ray.duckdb"
    assert (done := _geomap(*args, "--db", str(reference))).returncode == 0, done.stderr
    killed = _geomap(*args, "--engine", "ray", "--workers", "2", "--db", str(db), env={KILL_ENV: point})
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = len(_stored(db)["ledger"])
    assert 0 < partial < len(_stored(reference)["ledger"])
    rerun = _geomap(*args, "--engine", "ray", "--workers", "2", "--db", str(db))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{partial} already stored" in rerun.stdout
    _assert_same(_stored(db), _stored(reference))

"""The Ray engine against the inline one, on a local Ray (2 CPUs) and a tiny model: same store, also after a kill."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from geomap.capture.config import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.ingest.engine_config import EngineConfig
from geomap.store.db import connect
from geomap.store.vectors import verify_indexes
from geomap.store.writer import PromptSpec
from tests.raystore import PROMPTS, assert_same_store, capture_worker_pids, snapshot

ray = pytest.importorskip("ray")

CONFIG = CaptureConfig(attn_positions="all", lens_positions="all")
SPECS = [PromptSpec(text, "test", str(i), ("ray",)) for i, text in enumerate(PROMPTS)]
BATCH = 2


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 2**20,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inline_store(tiny_models, tmp_path_factory) -> dict:
    db = tmp_path_factory.mktemp("inline") / "inline.duckdb"
    ingest(tiny_models["llama"], SPECS, db, CONFIG, batch_size=BATCH, progress=False)
    return snapshot(db)


def _ray_run(model_dir: Path, db: Path, **kwargs):
    from geomap.ingest.ray_engine import ingest_ray

    return ingest_ray(str(model_dir), SPECS, db, CONFIG, batch_size=BATCH, progress=False,
                      engine=EngineConfig(kind="ray", workers=2, threads=1), **kwargs)


def test_ray_run_stores_what_the_inline_run_stores(local_ray, tiny_dirs, inline_store, tmp_path):
    db = tmp_path / "ray.duckdb"
    summary = _ray_run(tiny_dirs["llama"], db)
    assert (summary.stored, summary.failed, summary.skipped) == (len(SPECS) - 1, 1, 0)  # "   " is refused, as inline
    assert_same_store(snapshot(db), inline_store)
    con = connect(db, read_only=True)
    try:
        assert verify_indexes(con, db) == []  # FAISS indexes updated after the merge
        assert con.execute("SELECT status FROM runs").fetchall() == [("done",)]
    finally:
        con.close()
    again = _ray_run(tiny_dirs["llama"], db)  # a rerun skips every stored key and merges nothing
    assert (again.stored, again.skipped) == (0, len(SPECS))
    assert_same_store(snapshot(db), inline_store)


def test_a_worker_killed_mid_run_leaves_the_same_store(local_ray, tiny_dirs, inline_store, tmp_path):
    db, killed = tmp_path / "killed-worker.duckdb", []

    def kill_one_worker(progress: dict) -> None:
        if progress["stored"] and not killed:
            pids = capture_worker_pids(os.getpid())
            assert pids, "no capture actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    summary = _ray_run(tiny_dirs["llama"], db, on_progress=kill_one_worker)
    assert killed and summary.stored + summary.failed == len(SPECS)
    assert_same_store(snapshot(db), inline_store)
    from ray._private.state import actors

    restarts = [a["NumRestarts"] for a in actors().values() if "CaptureWorker" in a["ActorClassName"]]
    assert max(restarts) >= 1  # Ray restarted the killed worker (and retried what it held)

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
from geomap.store.segments import layout, new_store_layout
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
    from geomap.ingest.runs import RunOptions

    return ingest_ray(str(model_dir), SPECS, db, RunOptions(CONFIG, batch_size=BATCH, progress=False, **kwargs),
                      engine=EngineConfig(kind="ray", workers=2, threads=1))


def _leftover_shards(loaded, folder: Path, n: int) -> tuple[Path, Path]:
    """A shard of the first ``n`` prompts, as a killed run's worker leaves it, and one of another capture config."""
    from geomap.capture.engine import capture
    from geomap.ingest.runs import model_identity
    from geomap.store.shards import build_shard, write_shard
    from geomap.store.writer import prompt_key

    paths = []
    for config in (CONFIG, CaptureConfig()):
        meta = {"model": model_identity(loaded), "capture": config.to_json()}
        journeys = capture(loaded, [s.text for s in SPECS[:n]], config, batch_size=BATCH)
        items = [(s, prompt_key(meta["model"], meta["capture"], s.text), j) for s, j in zip(SPECS[:n], journeys)]
        paths.append(write_shard(build_shard(items, "float32", meta), folder))
    return paths[0], paths[1]


def test_ray_run_stores_what_the_inline_run_stores(local_ray, tiny_dirs, tiny_models, inline_store, tmp_path):
    from geomap.ingest.ray_engine import shard_folder

    db = tmp_path / "ray.duckdb"
    folder = shard_folder(db, EngineConfig(kind="ray"))
    leftover, foreign = _leftover_shards(tiny_models["llama"], folder, 3)
    summary = _ray_run(tiny_dirs["llama"], db)
    assert (summary.stored, summary.failed, summary.skipped) == (len(SPECS) - 1, 1, 0)  # "   " is refused, as inline
    assert_same_store(snapshot(db), inline_store)
    assert not leftover.exists() and foreign.exists()  # merged and removed; another config's shard left alone
    assert [p.name for p in folder.iterdir()] == [foreign.name]
    con = connect(db, read_only=True)
    try:
        assert verify_indexes(con, db) == []  # FAISS indexes updated after the merge
        assert con.execute("SELECT status FROM runs").fetchall() == [("done",)]
        assert layout(con) == new_store_layout()  # the driver created the store as any new store
        if layout(con) == "segments":  # the driver merged every shard into segment files, none into rows
            assert con.execute("SELECT count(*) FROM internal.states_rows").fetchall() == [(0,)]
            in_segments = con.execute("SELECT sum(rows) FROM internal.segments WHERE table_name = 'states'")
            assert in_segments.fetchall()[0][0] == con.execute("SELECT count(*) FROM states").fetchall()[0][0]
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
    from geomap.ingest.ray_engine import shard_folder

    assert not list(shard_folder(db, EngineConfig(kind="ray")).iterdir())  # merged shards and half-written ones gone
    from ray._private.state import actors

    restarts = [a["NumRestarts"] for a in actors().values() if "CaptureWorker" in a["ActorClassName"]]
    assert max(restarts) >= 1  # Ray restarted the killed worker (and retried what it held)


def _runs(db: Path) -> list[tuple]:
    con = connect(db, read_only=True)
    try:
        return con.execute("SELECT id, status FROM runs ORDER BY id").fetchall() if con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'runs'").fetchall()[0][0] else []
    finally:
        con.close()


def _both(tiny_dirs, tiny_models, tmp_path, config=CONFIG):
    """Run the same prompts inline and on Ray into fresh stores; each engine's error (or None) and its store."""
    from geomap.ingest.ray_engine import ingest_ray
    from geomap.ingest.runs import RunOptions

    out = {}
    for engine in ("inline", "ray"):
        db = tmp_path / f"{engine}.duckdb"
        try:
            if engine == "inline":
                ingest(tiny_models["llama"], SPECS, db, config, batch_size=BATCH, progress=False)
            else:
                ingest_ray(str(tiny_dirs["llama"]), SPECS, db, RunOptions(config, batch_size=BATCH, progress=False),
                           engine=EngineConfig(kind="ray", workers=2, threads=1))
            out[engine] = (None, db)
        except Exception as exc:  # noqa: BLE001 - the error is what the test compares
            out[engine] = (exc, db)
    return out


def test_a_model_mismatch_ends_a_ray_run_as_it_ends_an_inline_run(local_ray, tiny_dirs, tiny_models, tmp_path):
    from geomap.errors import GeomapError

    got = _both(tiny_dirs, tiny_models, tmp_path, CaptureConfig(layers=(99,)))
    (inline, inline_db), (on_ray, ray_db) = got["inline"], got["ray"]
    assert isinstance(inline, GeomapError) and type(on_ray) is type(inline)
    assert str(on_ray) == str(inline) and "layers [99]" in str(inline)
    assert _runs(inline_db) == _runs(ray_db) == []  # refused before any run row exists


def test_a_storage_error_ends_a_ray_run_as_it_ends_an_inline_run(local_ray, tiny_dirs, tiny_models, tmp_path,
                                                                  monkeypatch):
    import geomap.ingest.merger as merger
    from geomap.store.db import StorageError

    real_merge = merger.merge_shard

    def full_disk(con, shard, *args, **kwargs):
        if con.execute("SELECT count(*) FROM merged_shards").fetchall()[0][0]:  # after a run's first merge
            raise OSError(28, "No space left on device")
        return real_merge(con, shard, *args, **kwargs)

    monkeypatch.setattr(merger, "merge_shard", full_disk)
    got = _both(tiny_dirs, tiny_models, tmp_path)
    monkeypatch.setattr(merger, "merge_shard", real_merge)
    (inline, inline_db), (on_ray, ray_db) = got["inline"], got["ray"]
    assert isinstance(inline, StorageError) and isinstance(on_ray, StorageError)
    assert str(on_ray).replace(str(ray_db), "DB") == str(inline).replace(str(inline_db), "DB")
    assert "No space left on device" in str(inline)
    assert _runs(inline_db) == _runs(ray_db) == [(1, "failed")]
    again = _ray_run(tiny_dirs["llama"], ray_db)  # the rerun takes the failed run up again, as inline
    assert again.run_id == 1 and _runs(ray_db) == [(1, "done")]

"""`geomap run --engine ray` as a user runs it: the [engine] table, a driver killed and rerun, and no Ray installed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

from geomap.errors import GeomapError
from geomap.ingest.engine_config import EngineConfig
from geomap.ingest.pipeline import load_pipeline
from tests.raystore import PROMPTS, assert_same_store, capture_worker_pids, snapshot

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _pipeline(tmp_path: Path, model_dir: Path, engine: str = "", top: str = "") -> Path:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(p for p in PROMPTS if p.strip()), encoding="utf-8")
    toml = tmp_path / "pipe.toml"
    toml.write_text(f'name = "raytest"\nmodel = "{model_dir}"\nbatch_size = 2\n{top}[capture]\nattn_positions = "all"\n'
                    f'lens_positions = "all"\n[[sources]]\npath = "prompts.txt"\n{engine}', encoding="utf-8")
    return toml


def _continuations(db: Path) -> int:
    """Stored prompts that continue another (a pipeline's continuation_tokens)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM prompts WHERE parent_id IS NOT NULL").fetchall()[0][0]
    finally:
        con.close()


def _geomap(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "geomap", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env or ENV)


def test_engine_table_and_flags(tmp_path, tiny_dirs):
    pipe = load_pipeline(_pipeline(tmp_path, tiny_dirs["llama"], '[engine]\nkind = "ray"\nworkers = 2\n'))
    assert pipe.engine == EngineConfig(kind="ray", workers=2)
    assert pipe.engine.override(None, "10.0.0.5:6379", 3) == EngineConfig("ray", "10.0.0.5:6379", 3)
    assert load_pipeline(_pipeline(tmp_path, tiny_dirs["llama"])).engine.kind == "inline"
    for bad, word in [('kind = "spark"', "kind"), ("workers = 0", "workers"), ('workers = "2"', "workers"),
                      ("max_restarts = -1", "max_restarts"), ("gpus = 1", "unknown")]:
        with pytest.raises(GeomapError, match=word):
            load_pipeline(_pipeline(tmp_path, tiny_dirs["llama"], f"[engine]\n{bad}\n"))
    with pytest.raises(GeomapError, match="--engine ray"):
        EngineConfig().override(None, None, 2)


def test_without_ray_the_engine_is_one_clear_line(tmp_path, tiny_dirs):
    shim = tmp_path / "shim" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named ray (blocked by the test)')\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(shim.parent), *filter(None, [ENV.get("PYTHONPATH")])])}
    db = tmp_path / "none.duckdb"
    proc = _geomap("run", str(_pipeline(tmp_path, tiny_dirs["llama"])), "--engine", "ray", "--db", str(db), env=env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: ") and "pip install 'geomap[ray]'" in lines[0]
    assert not db.exists()  # nothing touched


def _progress(proc: subprocess.Popen, seen: list[int], done: threading.Event) -> None:
    """Collect the prompts-done counts the progress bar shows on stderr."""
    buffer = ""
    while chunk := proc.stderr.read(1):
        buffer += chunk
        if chunk in "\r\n":
            if m := re.search(r"\(ray\):\s+\d+%\|[^|]*\|\s*(\d+)/\d+", buffer):
                seen.append(int(m.group(1)))
                if int(m.group(1)) > 0:
                    done.set()
            buffer = ""
    done.set()


def test_a_killed_driver_resumes_with_the_same_command(tmp_path, tiny_dirs):
    pytest.importorskip("ray")
    # continuations too: the Ray engine stores them as the inline run does (the driver generates them)
    toml = _pipeline(tmp_path, tiny_dirs["llama"], '[engine]\nkind = "ray"\nworkers = 2\n', "continuation_tokens = 2\n")
    reference, db = tmp_path / "inline.duckdb", tmp_path / "ray.duckdb"
    inline = _geomap("run", str(toml), "--engine", "inline", "--db", str(reference))
    assert inline.wait(timeout=600) == 0, inline.stderr.read()

    proc = _geomap("run", str(toml), "--db", str(db))  # the [engine] table asks for Ray
    seen, merged = [], threading.Event()
    threading.Thread(target=_progress, args=(proc, seen, merged), daemon=True).start()
    assert merged.wait(timeout=600)
    workers = capture_worker_pids(proc.pid)
    proc.send_signal(signal.SIGKILL)  # the driver dies after its first merged batch
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, seen
    assert len(workers) == 2
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # the workers went with their driver
    partial = snapshot(db)["counts"]["prompts"]
    assert 0 < partial < len(PROMPTS) - 1

    start = time.perf_counter()
    again = _geomap("run", str(toml), "--db", str(db), "--json")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert f'"skipped": {partial}' in out, (out, time.perf_counter() - start)
    assert_same_store(snapshot(db), snapshot(reference))
    assert _continuations(db) == _continuations(reference) == len([p for p in PROMPTS if p.strip()])
    assert not list((tmp_path / "ray.shards").glob("*"))  # every shard merged once, then removed


def test_a_server_runs_the_ray_engine_for_the_cli(tmp_path, tiny_dirs):
    """With `geomap serve` owning the store, `--engine ray` goes to the server: it drives Ray and merges the shards."""
    pytest.importorskip("ray")
    from tests.serve.test_serve import Api, start_server, stop_server

    toml = _pipeline(tmp_path, tiny_dirs["llama"])
    reference, db = tmp_path / "inline.duckdb", tmp_path / "served.duckdb"
    inline = _geomap("run", str(toml), "--engine", "inline", "--db", str(reference))
    assert inline.wait(timeout=600) == 0, inline.stderr.read()
    proc, port = start_server(db, tiny_dirs["llama"], "--ray")
    try:
        refused = _geomap("run", str(toml), "--engine", "ray", "--address", "10.0.0.5:6379", "--db", str(db))
        _, err = refused.communicate(timeout=300)
        assert refused.returncode == 2 and "--address" in err and "Traceback" not in err, err
        served = _geomap("run", str(toml), "--engine", "ray", "--workers", "2", "--db", str(db), "--json")
        out, err = served.communicate(timeout=600)
        assert served.returncode == 0, err
        assert "(server, ray)" in err
        run_id = json.loads(out.splitlines()[0])["run_id"]
        assert Api(port).ok("GET", f"/runs/{run_id}")["job"]["engine"] == "ray"
        status, got = Api(port).call("POST", "/runs", {"prompts": ["x"], "engine": {"kind": "inline", "workers": 2}})
        assert status == 422 and "engine.kind 'ray'" in json.dumps(got), got
    finally:
        log = stop_server(proc)
    assert "Traceback" not in log, log
    assert_same_store(snapshot(db), snapshot(reference))
    assert not list((tmp_path / "served.shards").glob("*"))  # every shard merged once, then removed

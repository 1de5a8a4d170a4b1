"""Killing ingestion with SIGKILL at random moments, then rerunning, gives exactly an uninterrupted run's rows."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import duckdb

from geomap.store.db import connect
from geomap.store.vectors import verify_indexes

KILLS = 20
TABLES = ["prompts", "tokens", "states", "contributions", "attention", "norms", "mlp_features", "lens", "lens_stats",
          "next_token", "final_logits"]


def _ingest(model_dir, prompts, db) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "geomap", "ingest", str(prompts), "--db", str(db), "--model", str(model_dir),
         "--batch-size", "2", "--attn-positions", "all", "--lens-positions", "all"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _snapshot(db) -> dict:
    con = duckdb.connect(str(db), read_only=True)
    try:
        counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in TABLES}
        keys = con.execute("SELECT key, count(*) FROM prompts GROUP BY key HAVING count(*) > 1").fetchall()
        states = con.execute("""SELECT p.key, s.pos, s.layer, round(s.norm, 4) FROM states s
                                JOIN prompts p ON p.id = s.prompt_id ORDER BY ALL""").fetchall()
        ids = con.execute("SELECT min(id), max(id), count(*) FROM states").fetchall()[0]
        return {"counts": counts, "duplicates": keys, "states": states, "ids": ids}
    finally:
        con.close()


def test_sigkill_at_random_moments_then_resume(tiny_dirs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Prompt number {i}: the storm is {'very ' * (i % 5)}close" for i in range(40)))
    model_dir = tiny_dirs["llama"]
    reference = tmp_path / "reference.duckdb"
    start = time.perf_counter()
    assert _ingest(model_dir, prompts, reference).wait(timeout=600) == 0
    full_run = time.perf_counter() - start

    db = tmp_path / "killed.duckdb"
    rng = random.Random(1234)
    for _ in range(KILLS):
        proc = _ingest(model_dir, prompts, db)
        time.sleep(rng.uniform(0.3 * full_run, 1.1 * full_run))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _ingest(model_dir, prompts, db).wait(timeout=600) == 0

    got, want = _snapshot(db), _snapshot(reference)
    assert got["duplicates"] == []
    assert got["counts"] == want["counts"]
    assert got["states"] == want["states"]
    assert got["ids"] == (1, want["counts"]["states"], want["counts"]["states"])  # contiguous, no gaps
    con = connect(db, read_only=True)
    try:
        assert verify_indexes(con, db) == []  # FAISS ntotal and max id equal DuckDB's, files match the manifest
    finally:
        con.close()

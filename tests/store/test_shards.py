"""Shards: written by any process, merged idempotently by the one writer; old stores migrate; kills lose nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from geomap.capture import CaptureConfig, iter_capture
from geomap.ingest.engine import ingest
from geomap.ingest.runs import ensure_vocab, model_identity, start_run
from geomap.store.db import connect, ensure_schema
from geomap.store.query import final_logits
from geomap.store.shards import ShardError, build_shard, merge_shard, read_shard, write_shard
from geomap.store.vectors import sync_state_indexes, verify_indexes
from geomap.store.writer import TABLES, PromptSpec, prompt_key

TEXTS = ["The storm is", "Paris is the capital of", "def add(a, b):", "Snow fell all night", "The river is",
         "Once upon a time", "Water boils at", "The market is"]


@pytest.fixture
def llama(tiny_models):
    return tiny_models["llama"]


def items(loaded, texts, config=None):
    config = config or CaptureConfig()
    ident, cj = model_identity(loaded), config.to_json()
    captured = dict(iter_capture(loaded, texts, config, 4))
    return [(PromptSpec(t), prompt_key(ident, cj, t), captured[i]) for i, t in enumerate(texts)]


def new_store(loaded, path):
    con = connect(path)
    ensure_schema(con, loaded.anatomy.d_model)
    ensure_vocab(con, loaded)
    run_id = start_run(con, loaded, CaptureConfig(), "float32", "test")
    return con, run_id


def by_key(db) -> dict:
    """Every table's rows, keyed by prompt key and with store ids left out: what two stores must agree on."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        out = {"prompts": sorted(con.execute("SELECT key, text, status, n_tokens FROM prompts").fetchall())}
        for name in TABLES:
            cols = [r[0] for r in con.execute(f"DESCRIBE {name}").fetchall() if r[0] not in ("prompt_id", "id")]
            if name == "final_logits":  # NaN padding never equals itself
                cols = ["chunk", "list_filter(t.logits::FLOAT[], lambda x: NOT isnan(x))"]
            rows = con.execute(f"SELECT p.key, {', '.join(c if '(' in c else 't.' + c for c in cols)} FROM {name} t "  # noqa: S608
                               "JOIN prompts p ON p.id = t.prompt_id").fetchall()
            out[name] = sorted(rows, key=repr)
        out["duplicates"] = con.execute("SELECT key FROM prompts GROUP BY key HAVING count(*) > 1").fetchall()
        out["state_ids"] = con.execute("SELECT count(*) = count(DISTINCT id) FROM states").fetchall()[0][0]
        return out
    finally:
        con.close()


def structure(db) -> dict:
    """Every table's rows by prompt key with their integer and text columns only (batching moves the floats)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        out = {}
        for name in TABLES:
            cols = [r[0] for r in con.execute(f"DESCRIBE {name}").fetchall() if r[0] not in ("prompt_id", "id")
                    and r[1] in ("INTEGER", "SMALLINT", "BIGINT", "VARCHAR", "BOOLEAN", "INTEGER[]")]
            out[name] = sorted(con.execute(f"SELECT p.key, {', '.join('t.' + c for c in cols)} FROM {name} t "
                                           "JOIN prompts p ON p.id = t.prompt_id").fetchall(), key=repr)
        vecs = con.execute("SELECT p.key, s.pos, s.layer, s.vec FROM states s JOIN prompts p ON p.id = s.prompt_id "
                           "ORDER BY ALL").fetchall()
        return {"rows": out, "vectors": np.asarray([v[3] for v in vecs], np.float32),
                "where": [v[:3] for v in vecs]}
    finally:
        con.close()


def test_shard_round_trip_and_merge_twice_changes_nothing(llama, tmp_path):
    batch = items(llama, TEXTS[:3])
    shard = build_shard(batch, "float32", {"model": model_identity(llama)})
    path = write_shard(shard, tmp_path / "shards")
    assert write_shard(shard, tmp_path / "shards") == path  # already there: kept
    again = read_shard(path)
    assert again.shard_id == shard.shard_id and again.keys == shard.keys
    for name, table in shard.tables.items():
        if name == "final_logits":  # NaN padding: compare the numbers, NaN equal to NaN
            np.testing.assert_array_equal(again.tables[name].column("logits").combine_chunks().flatten(),
                                          table.column("logits").combine_chunks().flatten())
        else:
            assert again.tables[name].cast(table.schema).equals(table), name
    con, run_id = new_store(llama, tmp_path / "a.duckdb")
    first = merge_shard(con, again, run_id)
    second = merge_shard(con, again, run_id)
    con.close()
    assert first["prompts"] == 3 and second == {"prompts": 0, "skipped": 3, "errors": {}, "tokens": 0}
    ingest(llama, [PromptSpec(t) for t in TEXTS[:3]], tmp_path / "b.duckdb", progress=False, index=False)
    assert by_key(tmp_path / "a.duckdb") == by_key(tmp_path / "b.duckdb")


def test_a_prompt_in_two_shards_is_stored_once(llama, tmp_path):
    batch = items(llama, TEXTS[:4])
    con, run_id = new_store(llama, tmp_path / "a.duckdb")
    counts = [merge_shard(con, build_shard(part, "bfloat16"), run_id) for part in (batch[:3], batch[1:])]
    con.close()
    assert [c["prompts"] for c in counts] == [3, 1] and counts[1]["skipped"] == 2
    got = by_key(tmp_path / "a.duckdb")
    assert len(got["prompts"]) == 4 and not got["duplicates"] and got["state_ids"]


def test_a_damaged_shard_is_refused(llama, tmp_path):
    path = write_shard(build_shard(items(llama, TEXTS[:2]), "float32"), tmp_path)
    table = pq.read_table(path / "states.parquet")
    pq.write_table(table.slice(0, table.num_rows - 1), path / "states.parquet")
    with pytest.raises(ShardError, match="does not match"):
        read_shard(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ShardError, match="not a complete shard"):
        read_shard(path)


def test_final_logits_in_chunks_equal_the_models(llama, tmp_path):
    import torch

    db = tmp_path / "a.duckdb"
    ingest(llama, [PromptSpec(TEXTS[0])], db, progress=False, index=False)
    ids = llama.tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = llama.model(input_ids=ids).logits[0, -1].numpy()
    con = duckdb.connect(str(db), read_only=True)
    got = final_logits(con, 1)
    con.close()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _to_old_layout(db) -> dict[int, np.ndarray]:
    """Rewrite ``final_logits`` as geomap 0.1 stored it (one FLOAT[] row per prompt); return what it held."""
    con = duckdb.connect(str(db))
    held = {pid: final_logits(con, pid) for (pid,) in con.execute("SELECT DISTINCT prompt_id FROM final_logits")
            .fetchall()}
    con.execute("DROP TABLE final_logits")
    con.execute("CREATE TABLE final_logits (prompt_id INTEGER PRIMARY KEY, logits FLOAT[])")
    con.executemany("INSERT INTO final_logits VALUES (?, ?)", [(p, v.tolist()) for p, v in held.items()])
    con.execute("DELETE FROM store_meta WHERE key = 'schema_sha256'")
    con.close()
    return held


def _ingest_cli(model_dir, prompts, db) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "geomap", "ingest", str(prompts), "--db", str(db), "--model",
                             str(model_dir), "--batch-size", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_ingest_kill_merge_twice_and_migrate_store_every_row_once(llama, tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOMAP_STORE_LAYOUT", "rows")  # the chunking migration is of row stores (older than segments)
    db, clean = tmp_path / "s.duckdb", tmp_path / "clean.duckdb"
    ingest(llama, [PromptSpec(t) for t in TEXTS[:2]], db, progress=False)
    held = _to_old_layout(db)  # a store written before final_logits was chunked
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TEXTS[:6]) + "\n")
    proc = _ingest_cli(tiny_dirs["llama"], prompts, db)  # migrates on open, then is killed mid-run
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            with duckdb.connect(str(db), read_only=True) as peek:
                if peek.execute("SELECT count(*) FROM prompts").fetchall()[0][0] >= 3:
                    break
        except duckdb.Error:
            continue  # the writer holds the lock: look again
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _ingest_cli(tiny_dirs["llama"], prompts, db).wait(timeout=300) == 0  # the same command completes it
    con, run_id = connect(db), None
    run_id = con.execute("SELECT max(id) FROM runs").fetchall()[0][0]
    shard = read_shard(write_shard(build_shard(items(llama, TEXTS[4:]), "float32"), tmp_path / "shards"))
    merged = [merge_shard(con, shard, run_id) for _ in range(2)]
    sync_state_indexes(con, db)
    con.close()
    assert [m["prompts"] for m in merged] == [2, 0]  # TEXTS[4:6] were stored by the ingestion; 6 and 7 are new
    ingest(llama, [PromptSpec(t) for t in TEXTS], clean, progress=False)
    got, want = structure(db), structure(clean)
    assert got["rows"] == want["rows"] and got["where"] == want["where"]
    np.testing.assert_allclose(got["vectors"], want["vectors"], rtol=1e-4, atol=1e-4)
    assert not by_key(db)["duplicates"] and by_key(db)["state_ids"]
    con = duckdb.connect(str(db), read_only=True)
    for pid, logits in held.items():
        np.testing.assert_array_equal(final_logits(con, pid), logits)  # migrated bit for bit
    assert con.execute("SELECT count(*) FROM prompts").fetchall()[0][0] == len(TEXTS)
    con.close()
    con = connect(db, read_only=True)
    try:
        assert verify_indexes(con, db) == []
    finally:
        con.close()

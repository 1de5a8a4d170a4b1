"""The DuckDB store: rows match the capture, keys make reruns idempotent, bad input never corrupts it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import duckdb
import numpy as np
import pytest

from geomap.capture import CaptureConfig, capture
from geomap.ingest.engine import ingest
from geomap.store.codec import decode_bf16, encode_bf16, from_blob
from geomap.store.db import StoreLockedError, connect, ensure_schema
from geomap.store.shards import write_batch
from geomap.store.writer import PromptSpec

PROMPTS = ["The storm is", "Paris", "def add(a, b):", ""]
ALL = CaptureConfig(attn_positions="all", lens_positions="all", top_k=5)


@pytest.fixture
def llama(tiny_models):
    return tiny_models["llama"]


def counts(db) -> dict[str, int]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        tables = ["prompts", "tokens", "states", "contributions", "attention", "norms", "mlp_features", "lens",
                  "lens_stats", "next_token", "final_logits"]
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
    finally:
        con.close()


@pytest.mark.parametrize("name", ["llama", pytest.param("real", marks=pytest.mark.real)])
def test_row_counts_match_the_capture(name, tiny_models, request, tmp_path):
    from geomap.store.vectors import open_state_index

    llama = request.getfixturevalue("real") if name == "real" else tiny_models[name]
    db = tmp_path / "s.duckdb"
    summary = ingest(llama, [PromptSpec(t) for t in PROMPTS], db, ALL, progress=False)
    assert (summary.stored, summary.failed, summary.skipped) == (3, 1, 0)
    journeys = [j for j in capture(llama, PROMPTS[:3], ALL)]
    a = llama.anatomy
    n_tok = sum(len(j.tokens) for j in journeys)
    got = counts(db)
    assert got["prompts"] == 4 and got["tokens"] == n_tok
    assert got["states"] == (a.n_layers + 1) * n_tok
    assert got["contributions"] == a.n_layers * n_tok
    assert got["attention"] == a.n_layers * a.n_heads * n_tok
    assert got["lens"] == got["lens_stats"] == (a.n_layers + 1) * n_tok
    assert got["next_token"] == n_tok and got["final_logits"] == 3 * -(-a.vocab_size // 4096)
    assert got["mlp_features"] == a.n_layers * n_tok
    con = duckdb.connect(str(db), read_only=True)
    j = journeys[0]
    vec = np.array(con.execute("SELECT vec FROM states WHERE prompt_id = 1 AND layer = 2 AND pos = 1").fetchone()[0])
    np.testing.assert_array_equal(vec, j.stream.resid[2, 1])
    weights = con.execute("SELECT weights FROM attention WHERE prompt_id = 1 AND layer = 1 AND head = 2 AND pos = 3"
                          ).fetchone()[0]
    np.testing.assert_allclose(weights, j.attention.weights[1, 2, 3], rtol=1e-6)
    error = con.execute("SELECT status, error FROM prompts WHERE text = ''").fetchone()
    assert error[0] == "error" and "empty" in error[1]
    assert con.execute("SELECT count(*) FROM journey").fetchall()[0][0] == 3
    text = con.execute("""SELECT count(*), count(*) FILTER (WHERE l.top1_token IS NOT DISTINCT FROM v.text)
                          FROM lens_stats l JOIN prompts p ON p.id = l.prompt_id JOIN runs r ON r.id = p.run_id
                          JOIN vocab v ON v.weights_sha256 = r.weights_sha256 AND v.token_id = l.top1_id""").fetchall()
    assert text[0][0] == got["lens_stats"] and text[0][1] == text[0][0]  # the copied text is the vocabulary's
    lens = con.execute("SELECT token_ids, logits FROM lens WHERE prompt_id = 1 AND layer = ? AND pos = 2",
                       [a.n_layers]).fetchall()[0]
    np.testing.assert_array_equal(lens[0], j.lens.top.ids[-1, 2])
    np.testing.assert_allclose(lens[1], j.lens.top.logits[-1, 2], rtol=1e-5)
    for layer in range(a.n_layers + 1):  # DuckDB row counts equal FAISS ntotal, ids included
        index = open_state_index(con, db, layer)
        ids = con.execute("SELECT id FROM states WHERE layer = ?", [layer]).fetchnumpy()["id"]
        assert index.index.ntotal == len(ids) == n_tok
        found, _ = index.search(np.stack(con.execute("SELECT vec FROM states WHERE layer = ? ORDER BY id",
                                                     [layer]).fetchnumpy()["vec"]), 1)
        assert set(found[:, 0]) <= set(ids)


def test_rerun_is_idempotent_and_config_changes_store_new_rows(llama, tmp_path):
    db = tmp_path / "s.duckdb"
    specs = [PromptSpec(t) for t in PROMPTS[:3]]
    ingest(llama, specs, db, ALL, progress=False, index=False)
    before = counts(db)
    again = ingest(llama, specs, db, ALL, progress=False, index=False)
    assert again.skipped == 3 and again.stored == 0 and counts(db) == before
    other = ingest(llama, specs, db, dataclasses.replace(ALL, top_k=7), progress=False, index=False)
    assert other.stored == 3 and counts(db)["prompts"] == 6


def test_bfloat16_round_trip_keeps_gemma_residuals_finite(real, tmp_path):
    (j,) = capture(real, ["The storm is"])
    resid = j.stream.resid
    assert np.abs(resid).max() > 65504, "Gemma-3 residuals exceed float16's range"
    with np.errstate(over="ignore"):  # the overflow is the point
        assert not np.isfinite(resid.astype(np.float16)).all()
    back = decode_bf16(encode_bf16(resid))
    assert np.isfinite(back).all()
    assert (np.abs(back - resid) <= np.abs(resid) * 2.0 ** -8).all()
    db = tmp_path / "bf16.duckdb"
    ingest(real, [PromptSpec("The storm is")], db, CaptureConfig(), vector_dtype="bfloat16", progress=False,
           index=False)
    con = duckdb.connect(str(db), read_only=True)
    vec, blob = con.execute("SELECT vec, vec_bf16 FROM states WHERE layer = 18 AND pos = 3").fetchone()
    assert vec is None
    np.testing.assert_array_equal(from_blob(blob), back[18, 3])


def test_nan_states_are_refused_naming_the_prompt(llama, tmp_path):
    (j,) = capture(llama, ["The storm is"])
    resid = j.stream.resid.copy()
    resid[1, 0, 0] = np.nan
    bad = dataclasses.replace(j, stream=dataclasses.replace(j.stream, resid=resid))
    con = connect(tmp_path / "s.duckdb")
    ensure_schema(con, llama.anatomy.d_model)
    result = write_batch(con, 1, "float32", [(PromptSpec("The storm is"), "k1", bad)])
    assert "The storm is" in result["errors"]["The storm is"] and "NaN" in result["errors"]["The storm is"]
    assert con.execute("SELECT count(*) FROM states").fetchone()[0] == 0
    assert con.execute("SELECT status FROM prompts").fetchone()[0] == "error"


def test_second_writer_gets_a_clear_error(tmp_path):
    db = tmp_path / "s.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}); "
                               "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=rf"locked by process {holder.pid}"):
            connect(db)
    finally:
        holder.kill()
        holder.wait()
    con = connect(db)  # nothing corrupted: the store opens once the holder is gone
    con.close()


def test_older_store_gains_the_top1_token_column(llama, tmp_path):
    """A store written before lens_stats.top1_token existed is migrated on open, text filled from vocab."""
    db = tmp_path / "old.duckdb"
    ingest(llama, [PromptSpec("The storm is")], db, ALL, progress=False)
    con = duckdb.connect(str(db))
    con.execute("ALTER TABLE lens_stats DROP COLUMN top1_token")
    con.execute("DELETE FROM store_meta WHERE key = 'schema_sha256'")
    ensure_schema(con)
    missing, total = con.execute("SELECT count(*) FILTER (WHERE top1_token IS NULL), count(*) FROM lens_stats"
                                 ).fetchall()[0]
    expect = con.execute("SELECT v.text FROM lens_stats l JOIN vocab v ON v.token_id = l.top1_id "
                         "ORDER BY l.layer, l.pos").fetchall()
    got = con.execute("SELECT top1_token FROM trajectory WHERE top1_id IS NOT NULL ORDER BY layer, pos").fetchall()
    con.close()
    assert total > 0 and missing == 0 and got == expect


def test_write_batch_without_vocab_texts_takes_them_from_the_store(llama, tmp_path):
    """The generation path writes without the run's vocabulary array: the text comes from the stored vocab."""
    from geomap.ingest.runs import ensure_vocab

    (j,) = capture(llama, ["The storm is"], ALL)
    con = connect(tmp_path / "s.duckdb")
    ensure_schema(con, llama.anatomy.d_model)
    ensure_vocab(con, llama)
    con.execute("INSERT INTO runs (id, weights_sha256, status) VALUES (1, ?, 'running')", [llama.weights_hash])
    write_batch(con, 1, "float32", [(PromptSpec("The storm is"), "k1", j)])
    got = [r[0] for r in con.execute("SELECT top1_token FROM lens_stats ORDER BY layer, pos").fetchall()]
    con.close()
    from geomap.capture.tokens import describe_tokens

    assert got == list(describe_tokens(llama.tokenizer, j.lens.top.ids[..., 0].reshape(-1)).texts)

"""Damaged manifests and incomplete model metadata: verify sees them, rebuild and the next run repair them."""

from __future__ import annotations

import pytest

from geomap.ingest.engine import ingest
from geomap.ingest.runs import ensure_vocab
from geomap.store.db import connect
from geomap.store.query import neighbors
from geomap.store.vectors import IndexCorruptError, build_state_indexes, verify_indexes
from geomap.store.writer import PromptSpec

PROMPTS = [PromptSpec(t) for t in ("The storm is", "Paris is", "The river is", "A small fox")]


@pytest.fixture
def store(tiny_models, tmp_path):
    db = tmp_path / "s.duckdb"
    summary = ingest(tiny_models["llama"], PROMPTS, db, progress=False)
    assert summary.stored == len(PROMPTS)
    return db


def _problems(db):
    con = connect(db, read_only=True)
    try:
        return verify_indexes(con, db)
    finally:
        con.close()


def _rebuild(db):
    con = connect(db)
    try:
        build_state_indexes(con, db)
    finally:
        con.close()


@pytest.mark.parametrize("damage", [
    "UPDATE faiss_manifest SET std = list_transform(std, lambda x: 0.0) WHERE layer = 2",
    "UPDATE faiss_manifest SET mean = mean[1:5] WHERE layer = 2",
    "UPDATE faiss_manifest SET mean = list_transform(mean, lambda x: x + 1.0) WHERE layer = 2",
    "UPDATE faiss_manifest SET ntotal = ntotal + 1 WHERE layer = 2",
])
def test_verify_sees_damaged_statistics_and_rebuild_repairs_them(store, damage):
    want = neighbors(store, 1, 2, k=3)
    con = connect(store)
    con.execute(damage)
    con.close()
    problems = _problems(store)
    assert problems and any("Layer 2" in p for p in problems), problems
    if "ntotal" not in damage:
        with pytest.raises(IndexCorruptError, match="standardisation"):
            neighbors(store, 1, 2, k=3)  # never a silently wrong answer
    _rebuild(store)
    assert _problems(store) == []
    got = neighbors(store, 1, 2, k=3)
    assert got.state_id.tolist() == want.state_id.tolist()


def test_rebuild_needs_duckdb_only_even_without_the_manifest_table(store):
    con = connect(store)
    con.execute("DROP TABLE faiss_manifest")
    con.close()
    assert any("no faiss_manifest table" in p for p in _problems(store))
    _rebuild(store)
    assert _problems(store) == []


def test_leftover_temp_files_are_reported_then_finished_or_removed_by_the_next_write(store, tiny_models):
    folder = store.with_name("s.indexes")
    final = folder / "states-L001.faiss"
    stale = folder / "states-L002.faiss.tmp"
    stale.write_bytes(b"half a build")
    pending = final.with_name(final.name + ".tmp")
    final.rename(pending)  # as if killed between the manifest commit and the rename
    problems = _problems(store)
    assert any("interrupted build" in p and "L001" in p for p in problems)
    assert any("L002.faiss.tmp" in p for p in problems)
    summary = ingest(tiny_models["llama"], PROMPTS, store, progress=False)  # nothing to store; still tidies
    assert summary.run_id is None
    assert _problems(store) == []
    assert final.exists() and not pending.exists() and not stale.exists()


def test_incomplete_model_metadata_is_repaired(store, tiny_models):
    loaded = tiny_models["llama"]
    con = connect(store)
    try:
        names = con.execute("SELECT * FROM norm_names ORDER BY ALL").fetchall()
        n_vocab = con.execute("SELECT count(*) FROM vocab").fetchall()[0][0]
        con.execute("DELETE FROM norm_names")  # a kill between the two inserts of an older geomap
        con.execute("DELETE FROM vocab WHERE token_id >= 100")
        ensure_vocab(con, loaded)
        assert con.execute("SELECT * FROM norm_names ORDER BY ALL").fetchall() == names
        assert con.execute("SELECT count(*) FROM vocab").fetchall()[0][0] == n_vocab
    finally:
        con.close()


def test_a_failed_run_is_marked_and_the_next_run_finishes_it(tiny_models, tmp_path, monkeypatch):
    import geomap.ingest.merger as merger

    db = tmp_path / "s.duckdb"
    calls = {"n": 0}
    real_merge = merger.merge_shard

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device", str(db))
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(merger, "merge_shard", failing)
    with pytest.raises(Exception, match="No space left on device"):
        ingest(tiny_models["llama"], PROMPTS, db, batch_size=2, progress=False)
    monkeypatch.setattr(merger, "merge_shard", real_merge)
    con = connect(db, read_only=True)
    assert con.execute("SELECT id, status FROM runs").fetchall() == [(1, "failed")]
    con.close()
    summary = ingest(tiny_models["llama"], PROMPTS, db, batch_size=2, progress=False)
    assert summary.run_id == 1 and summary.stored == 2 and summary.skipped == 2
    con = connect(db, read_only=True)
    try:
        assert con.execute("SELECT id, status FROM runs").fetchall() == [(1, "done")]
        assert con.execute("SELECT count(*) FROM prompts").fetchall()[0][0] == len(PROMPTS)
    finally:
        con.close()

"""State and vocabulary FAISS indexes over a real DuckDB store (synthetic residual-like vectors)."""

from __future__ import annotations

import hashlib
import logging

import faiss
import numpy as np
import pyarrow as pa
import pytest

from geomap.store import files
from geomap.store.codec import decode_bf16, encode_bf16
from geomap.store.db import StoreError, connect, ensure_schema, index_dir
from geomap.store.vectors import (
    IndexCorruptError,
    build_state_indexes,
    open_state_index,
    sync_state_indexes,
    verify_indexes,
)
from geomap.store.vocab_index import vocab_index

D = 16
_CENTRES = np.random.default_rng(0).normal(size=(40, D)).astype(np.float32)


def residuals(n: int, seed: int) -> np.ndarray:
    """Clustered vectors with a few huge, offset dimensions, like raw residual streams."""
    rng = np.random.default_rng(seed)
    x = _CENTRES[rng.integers(0, len(_CENTRES), n)] + 0.6 * rng.normal(size=(n, D)).astype(np.float32)
    x[:, [2, 9]] = 2000.0 + 300.0 * x[:, [2, 9]]
    return x.astype(np.float32)


def insert(con, ids, layer: int, x: np.ndarray, bf16: np.ndarray | None = None) -> None:
    """Insert states; rows where ``bf16`` is True get vec NULL and a vec_bf16 BLOB."""
    n = len(ids)
    bf16 = np.zeros(n, dtype=bool) if bf16 is None else bf16
    vec = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), D, mask=pa.array(bf16))
    blobs = [encode_bf16(row).astype("<u2").tobytes() if b else None for row, b in zip(x, bf16)]
    table = pa.table({"id": pa.array(ids, pa.int64()), "layer": pa.array([layer] * n, pa.int16()), "vec": vec,
                      "vec_bf16": pa.array(blobs, pa.binary())})
    con.register("incoming", table)
    con.execute("INSERT INTO states (id, prompt_id, pos, layer, norm, cos_final, vec, vec_bf16) "
                "SELECT id, 0, 0, layer, 0, 0, vec, vec_bf16 FROM incoming")
    con.unregister("incoming")


def index_ids(index: faiss.Index) -> np.ndarray:
    if isinstance(index, faiss.IndexIDMap2):
        return np.sort(faiss.vector_to_array(index.id_map))
    ivf = faiss.extract_index_ivf(index)
    lists = [faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy() for i in range(ivf.nlist)]
    return np.sort(np.concatenate(lists))


def layer_ids(con, layer: int) -> np.ndarray:
    rows = con.execute("SELECT id FROM states WHERE layer = ? ORDER BY id", [layer]).fetchall()
    return np.array([r[0] for r in rows])


@pytest.fixture
def store(tmp_path):
    db = tmp_path / "store.duckdb"
    con = connect(db)
    ensure_schema(con, D, layout="rows")  # the tests insert states directly, into a table
    yield con, db
    con.close()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_ids_counts_and_self_match(store, kind):
    con, db = store
    data = {layer: residuals(3000, seed=layer) for layer in (0, 5)}
    for layer, x in data.items():
        insert(con, np.arange(3000) * 7 + 100_000 * layer + 3, layer, x)
    rows = build_state_indexes(con, db, kind=kind)
    assert [r["layer"] for r in rows] == [0, 5]
    for layer, x in data.items():
        state = open_state_index(con, db, layer)
        ids = layer_ids(con, layer)
        assert state.kind == kind and state.index.ntotal == len(ids)
        if kind != "hnsw":
            assert np.array_equal(index_ids(state.index), ids)
        found, sims = state.search(x[:300], 5)
        hit = found[:, 0] == ids[:300]
        assert hit.mean() >= (0.98 if kind == "hnsw" else 1.0)
        assert np.allclose(sims[hit, 0], 1.0, atol=2e-3 if kind == "ivf" else 1e-4)  # IVF holds float16 vectors
    row = con.execute("SELECT kind, path, metric, ntotal, max_id, len(mean), len(std) FROM faiss_manifest "
                      "WHERE layer = 5").fetchall()[0]
    assert row == (f"states:{kind}", "states-L005.faiss", "inner_product", 3000, 2999 * 7 + 500_003, D, D)
    assert verify_indexes(con, db) == []


def test_auto_ivf_recall_vs_flat(store, caplog):
    con, db = store
    n = 12_000
    x = residuals(n, seed=1)
    insert(con, np.arange(n), 3, x)
    with caplog.at_level(logging.INFO, logger="geomap.store.vectors"):
        build_state_indexes(con, db, threshold=10_000)
    state = open_state_index(con, db, 3)
    ivf = faiss.extract_index_ivf(state.index)
    print(f"auto IVF: n={n} nlist={ivf.nlist} nprobe={ivf.nprobe}; {caplog.messages}")
    assert state.kind == "ivf" and state.index.ntotal == n and ivf.nprobe < ivf.nlist
    assert np.array_equal(index_ids(state.index), np.arange(n))
    exact = faiss.IndexFlatIP(D)
    exact.add(state.prepare(x))
    queries = residuals(400, seed=99)
    _, truth = exact.search(state.prepare(queries), 10)
    found, _ = state.search(queries, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth.tolist(), found.tolist())])
    print(f"recall@10 vs flat on fresh queries: {recall:.3f}")
    assert recall >= 0.95


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete"])
def test_corrupt_index_detected_not_replaced_then_rebuilt(store, damage):
    con, db = store
    x = residuals(500, seed=2)
    insert(con, np.arange(500), 1, x)
    build_state_indexes(con, db)
    path = index_dir(db) / "states-L001.faiss"
    good = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "bitflip":
        path.write_bytes(good[:1000] + bytes([good[1000] ^ 0x10]) + good[1001:])
    else:
        path.unlink()
    before = path.read_bytes() if path.exists() else None
    with pytest.raises(IndexCorruptError) as err:
        open_state_index(con, db, 1)
    message = str(err.value)
    assert str(path) in message and "geomap index rebuild" in message
    assert hashlib.sha256(good).hexdigest() in message
    assert (path.read_bytes() if path.exists() else None) == before
    assert any("states-L001.faiss" in p for p in verify_indexes(con, db))
    insert(con, np.arange(500, 510), 1, residuals(10, seed=3))
    with pytest.raises(IndexCorruptError):
        sync_state_indexes(con, db)  # extending a damaged index refuses too
    assert (path.read_bytes() if path.exists() else None) == before
    build_state_indexes(con, db)
    assert open_state_index(con, db, 1).search(x[:1], 1)[0][0, 0] == 0
    assert verify_indexes(con, db) == []


def test_interrupted_build_rolls_forward(store, monkeypatch):
    con, db = store
    insert(con, np.arange(400), 2, residuals(400, seed=3))
    build_state_indexes(con, db)
    insert(con, np.arange(400, 600), 2, residuals(200, seed=4))

    def crash(*args):
        raise KeyboardInterrupt("killed between manifest commit and rename")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        sync_state_indexes(con, db)
    monkeypatch.undo()
    assert any("interrupted build" in p for p in verify_indexes(con, db))
    state = open_state_index(con, db, 2)  # finishes the rename
    assert state.index.ntotal == 600 and not (index_dir(db) / "states-L002.faiss.tmp").exists()
    assert verify_indexes(con, db) == []
    # A temp file left before the manifest commit is ignored: the old final file still matches.
    (index_dir(db) / "states-L002.faiss.tmp").write_bytes(b"half-written")
    assert open_state_index(con, db, 2).index.ntotal == 600


def test_sync_adds_exactly_new_ids(store):
    con, db = store
    insert(con, np.arange(0, 1000, 2), 4, residuals(500, seed=5))
    build_state_indexes(con, db)
    mean_before = open_state_index(con, db, 4).mean.copy()
    x_new = residuals(300, seed=6)
    insert(con, np.arange(5000, 5300), 4, x_new)
    assert any(p.startswith("Layer 4:") for p in verify_indexes(con, db))
    assert sync_state_indexes(con, db) == 300
    state = open_state_index(con, db, 4)
    assert np.array_equal(index_ids(state.index), layer_ids(con, 4))
    assert np.array_equal(state.mean, mean_before)
    assert np.array_equal(state.search(x_new[:50], 1)[0][:, 0], np.arange(5000, 5050))
    assert sync_state_indexes(con, db) == 0
    insert(con, np.arange(9000, 9100), 7, residuals(100, seed=7))
    assert "Layer 7: 100 states but no index." in verify_indexes(con, db)
    assert sync_state_indexes(con, db) == 100
    assert verify_indexes(con, db) == []


def test_bf16_rows_are_indexed(store):
    con, db = store
    x = residuals(600, seed=8)
    bf16 = np.arange(600) % 3 == 0
    insert(con, np.arange(600), 0, x, bf16=bf16)
    assert con.execute("SELECT count(*) FROM states WHERE vec IS NULL AND vec_bf16 IS NOT NULL").fetchall()[0][0] == 200
    build_state_indexes(con, db, kind="flat")
    state = open_state_index(con, db, 0)
    assert np.array_equal(index_ids(state.index), np.arange(600))
    stored = np.where(bf16[:, None], decode_bf16(encode_bf16(x)), x)
    found, sims = state.search(stored, 1)
    assert np.array_equal(found[:, 0], np.arange(600))
    assert np.allclose(sims[:, 0], 1.0, atol=1e-4)


def test_missing_layer_is_a_clear_error(store):
    con, db = store
    with pytest.raises(StoreError, match="Layer 9 has no state index"):
        open_state_index(con, db, 9)


def test_vocab_index_exact_and_cached(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "home" / "faiss"  # the caller's cache folder: the store takes nothing from models
    rng = np.random.default_rng(10)
    matrix = rng.normal(size=(2000, D)).astype(np.float32)
    weights_hash = "0123456789abcdef" * 4
    index = vocab_index(matrix, weights_hash, "unembed", folder)
    queries = rng.normal(size=(8, D)).astype(np.float32)
    scores, found = index.search(queries, 10)
    assert np.array_equal(found, np.argsort(-(matrix @ queries.T), axis=0)[:10].T)
    assert np.allclose(scores, np.sort(matrix @ queries.T, axis=0)[::-1][:10].T, atol=1e-4)
    path = tmp_path / "home" / "faiss" / "0123456789abcdef-unembed.faiss"
    mtime = path.stat().st_mtime_ns
    again = vocab_index(matrix, weights_hash, "unembed", folder)
    assert path.stat().st_mtime_ns == mtime
    assert np.array_equal(again.search(queries, 10)[1], found)
    tied = vocab_index(matrix, weights_hash, "embed", folder, tied=True)
    assert tied.ntotal == 2000 and path.stat().st_mtime_ns == mtime
    assert not (path.parent / "0123456789abcdef-embed.faiss").exists()
    raw = path.read_bytes()
    path.write_bytes(raw[:-8])
    with caplog.at_level(logging.WARNING, logger="geomap.store.vectors"):
        rebuilt = vocab_index(matrix, weights_hash, "unembed", folder)
    assert any("sha256" in m for m in caplog.messages)
    assert path.read_bytes() == raw and np.array_equal(rebuilt.search(queries, 10)[1], found)


def _built(tmp_path, name: str, rows: list[tuple[np.ndarray, int, np.ndarray]], budget: int, monkeypatch) -> dict:
    """Indexes built over ``rows`` (ids, layer, vectors: inserted in that order) with scans of ``budget`` bytes."""
    from geomap.store import index_build

    db = tmp_path / f"{name}.duckdb"
    con = connect(db)
    try:
        ensure_schema(con, D, layout="rows")
        for ids, layer, x in rows:
            insert(con, ids, layer, x)
        monkeypatch.setattr(index_build, "BUILD_BYTES", budget)
        build_state_indexes(con, db, threshold=2_000)
        out = {}
        for layer in (0, 1, 2):
            state = open_state_index(con, db, layer)
            found, sims = state.search(residuals(50, seed=7), 10)
            out[layer] = (state.kind, state.mean, state.std, index_ids(state.index), found, sims)
        return out
    finally:
        con.close()


def test_one_scan_for_many_layers_builds_what_a_scan_per_layer_builds(tmp_path, monkeypatch):
    """Layers built from one scan equal layers built one scan each, whatever order the rows come in."""
    x = {layer: residuals(n, seed=10 + layer) for layer, n in ((0, 45_000), (1, 500), (2, 800))}  # 0: sampled
    ids = {0: np.arange(45_000), 1: np.arange(45_000, 45_500), 2: np.arange(45_500, 46_300)}
    rows = [(ids[layer][i:i + 7_000], layer, x[layer][i:i + 7_000]) for layer in x
            for i in range(0, len(x[layer]), 7_000)]
    shared = _built(tmp_path, "one-scan", rows, 1 << 30, monkeypatch)
    alone = _built(tmp_path, "per-layer", rows[::-1], 1, monkeypatch)  # reversed insertion: another scan order
    assert [shared[layer][0] for layer in (0, 1, 2)] == ["ivf", "flat", "flat"]
    for layer in (0, 1, 2):
        kind, mean, std, stored, found, sims = shared[layer]
        np.testing.assert_allclose(alone[layer][1], mean, rtol=1e-6)
        np.testing.assert_allclose(alone[layer][2], std, rtol=1e-6)
        assert np.array_equal(alone[layer][3], stored) and np.array_equal(stored, np.sort(ids[layer]))
        assert (alone[layer][4] == found).mean() > 0.99  # the same neighbours (an IVF trained on the same sample)
        np.testing.assert_allclose(alone[layer][5], sims, atol=1e-3)


def test_coarse_training_equals_faiss_training_without_its_residual_copy():
    """`train_coarse` trains a float16 IVF exactly as ``index.train`` does: the same centroids, the same answers."""
    from geomap.store.index_build import new_index, standardise, train_coarse

    x = residuals(6_000, seed=3)
    z = standardise(x, x.mean(0), x.std(0))
    ours, theirs = new_index("ivf", z.shape[1], 40), new_index("ivf", z.shape[1], 40)
    train_coarse(ours, z.copy())
    theirs.train(z.copy())
    assert ours.is_trained
    centroids = [index.quantizer.reconstruct_n(0, 40) for index in (ours, theirs)]
    assert np.array_equal(*centroids)
    for index in (ours, theirs):
        index.add_with_ids(z, np.arange(len(z)))
        index.nprobe = 4
    assert all(np.array_equal(a, b) for a, b in zip(ours.search(z[:50], 10), theirs.search(z[:50], 10)))

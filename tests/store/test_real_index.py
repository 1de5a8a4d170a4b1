"""Approximate state indexes on real Gemma-3 residuals: self-match and recall@10 against exact search."""

from __future__ import annotations

import importlib
import inspect

import faiss
import numpy as np
import pyarrow as pa
import pytest

from geomap.capture import CaptureConfig
from geomap.capture.engine import iter_capture
from geomap.store.db import connect, ensure_schema
from geomap.store.vectors import build_state_indexes, open_state_index

pytestmark = pytest.mark.real

LAYERS = (6, 12)
MIN_TOKENS = 10_500
MODULES = ("argparse", "collections", "csv", "json", "logging", "pathlib", "re", "subprocess", "unittest",
           "itertools", "functools", "datetime", "decimal", "email", "http.client", "sqlite3", "threading", "zipfile",
           "tarfile", "statistics", "textwrap", "urllib.parse", "asyncio", "dataclasses", "enum", "inspect", "shutil")


def stdlib_prose(tokenizer, min_tokens: int, max_tokens: int = 120) -> list[str]:
    """Real English (the standard library's docstrings), packed into prompts of at most ``max_tokens``."""
    paragraphs: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in [module, *(getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_"))]:
            doc = inspect.getdoc(obj) if inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj) else None
            for para in (doc or "").split("\n\n"):
                para = " ".join(para.split())
                if len(para) > 40 and para not in paragraphs:
                    paragraphs.append(para)
    prompts, current, total = [], "", 0
    for para in paragraphs:
        candidate = f"{current} {para}".strip()
        if len(tokenizer(candidate)["input_ids"]) <= max_tokens:
            current = candidate
            continue
        if current:
            prompts.append(current)
            total += len(tokenizer(current)["input_ids"])
        current = para if len(tokenizer(para)["input_ids"]) <= max_tokens else ""
        if total >= min_tokens:
            break
    return prompts


@pytest.fixture(scope="module")
def real_store(real, tmp_path_factory):
    """A store holding only the states at LAYERS of ≥ 10.5k real tokens (a FAISS test needs nothing else)."""
    prompts = stdlib_prose(real.tokenizer, MIN_TOKENS)
    config = CaptureConfig(layers=LAYERS)
    db = tmp_path_factory.mktemp("real-index") / "store.duckdb"
    con = connect(db)
    ensure_schema(con, real.anatomy.d_model, layout="rows")  # states inserted directly, into a table
    next_id, n_tokens = 1, 0
    for index, journey in iter_capture(real, prompts, config, batch_size=8):
        resid = journey.stream.resid  # (L+1, T, d)
        n_tokens += resid.shape[1]
        for layer in LAYERS:
            x = resid[layer]
            n = len(x)
            table = pa.table({
                "id": pa.array(np.arange(next_id, next_id + n), pa.int64()),
                "prompt_id": pa.array(np.full(n, index + 1), pa.int32()),
                "pos": pa.array(np.arange(n), pa.int32()), "layer": pa.array(np.full(n, layer), pa.int16()),
                "vec": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])})
            con.register("incoming", table)
            con.execute("INSERT INTO states (id, prompt_id, pos, layer, vec) SELECT * FROM incoming")
            con.unregister("incoming")
            next_id += n
    assert n_tokens >= 10_000
    yield con, db, n_tokens
    con.close()


def layer_states(con, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = con.execute("SELECT id, pos, vec FROM states WHERE layer = ? ORDER BY id", [layer]).fetchnumpy()
    return rows["id"].astype(np.int64), rows["pos"], np.stack(rows["vec"]).astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_on_real_states(real_store, kind):
    con, db, n_tokens = real_store
    build_state_indexes(con, db, kind=kind)
    rng = np.random.default_rng(0)
    for layer in LAYERS:
        ids, pos, x = layer_states(con, layer)
        state = open_state_index(con, db, layer)
        assert state.kind == kind and state.index.ntotal == len(ids) == n_tokens
        exact = faiss.IndexFlatIP(x.shape[1])
        exact.add(state.prepare(x))
        queries = rng.choice(np.flatnonzero(pos > 0), 1000, replace=False)  # position 0 (BOS) repeats per prompt
        truth_sims, truth = exact.search(state.prepare(x[queries]), 10)
        found, sims = state.search(x[queries], 10)
        # Self-match: the nearest stored vector is the query itself (or an identical copy of it).
        first = np.searchsorted(ids, found[:, 0])
        self_match = np.all(x[first] == x[queries], axis=1)
        recall = np.mean([len(set(ids[t]) & set(f)) / 10 for t, f in zip(truth, found)])
        print(f"{kind} layer {layer}: n={len(ids)} self-match {self_match.mean():.4f} recall@10 {recall:.4f}")
        assert self_match.mean() >= (0.995 if kind == "hnsw" else 1.0)  # IVF probes the query's own list first
        np.testing.assert_allclose(sims[self_match, 0], 1.0, atol=1e-4)
        assert recall >= 0.95

"""Queries on a large segments store: 1M states over at least 500 segment files (`geomap bench --segments`).

The store is built the way a long ingestion leaves it before compaction: two real prompts ingested with the model
(so the journey report has a real journey to draw), then synthetic prompts appended batch by batch through the real
segment writer (`geomap.store.segments.store_segments`, in the batch's transaction with its ``prompts`` rows), one
``states`` segment per batch. The synthetic residuals perturb the real prompts' states of the same layer (each real
state seeds a cloud of neighbours), so the IVF index sees the clustered data it is built for. On that store: the
trajectory SQL of one prompt, kNN over one layer's index (built from the segments by the store's own
`build_state_indexes`) against exact search, and the journey report.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from geomap.bench.core import Figure, judged, median
from geomap.store.db import connect, in_transaction, writer_settings
from geomap.store.segments import store_segments

POSITIONS = 13  # tokens per synthetic prompt (the bench prompts have 12 to 20)
PROMPTS_PER_SEGMENT = 8


def _synthetic_batch(base: dict[int, np.ndarray], first_prompt: int, first_id: int, n_prompts: int,
                     rng: np.random.Generator) -> pa.Table:
    """``states`` rows of ``n_prompts`` synthetic prompts: every position at every layer, ids from ``first_id``."""
    layers = sorted(base)
    n = n_prompts * POSITIONS * len(layers)
    prompt = np.repeat(np.arange(first_prompt, first_prompt + n_prompts, dtype=np.int32), POSITIONS * len(layers))
    pos = np.tile(np.repeat(np.arange(POSITIONS, dtype=np.int32), len(layers)), n_prompts)
    layer = np.tile(np.asarray(layers, np.int16), n_prompts * POSITIONS)
    vec = np.empty((n, base[layers[0]].shape[1]), np.float32)
    for k in layers:
        rows = np.flatnonzero(layer == k)
        seeds = base[k][rng.integers(0, len(base[k]), len(rows))]
        scale = np.linalg.norm(seeds, axis=1, keepdims=True) * (0.35 / np.sqrt(seeds.shape[1]))
        vec[rows] = seeds + rng.standard_normal(seeds.shape, dtype=np.float32) * scale
    norms = np.linalg.norm(vec, axis=1).astype(np.float32)
    return pa.table({"id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
                     "prompt_id": pa.array(prompt), "pos": pa.array(pos), "layer": pa.array(layer),
                     "norm": pa.array(norms), "cos_final": pa.array(np.ones(n, np.float32)),
                     "vec": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), vec.shape[1]),
                     "vec_bf16": pa.nulls(n, pa.binary())})


def build_large_store(loaded, path: Path, n_states: int) -> dict:
    """Two real prompts, then synthetic ones until ``n_states`` states, one segment per batch; its shape."""
    from geomap.bench import prompts
    from geomap.bench.store_bench import bench_store, fresh_path
    from geomap.capture.config import CaptureConfig
    from geomap.ingest.engine import ingest
    from geomap.store.writer import PromptSpec

    path = fresh_path(path.parent, path.name)
    con = bench_store(loaded, path, "segments")
    con.execute("DELETE FROM runs")
    con.close()
    ingest(loaded, [PromptSpec(t) for t in prompts(2)], path, CaptureConfig(), progress=False)
    con = connect(path)
    writer_settings(con)
    base = {int(k): np.stack(v) for k, v in con.execute(
        "SELECT layer, list(vec) FROM states GROUP BY layer").fetchall()}
    next_prompt, next_id = [int(x) + 1 for x in con.execute(
        "SELECT (SELECT max(id) FROM prompts), (SELECT max(id) FROM states)").fetchall()[0]]
    per_segment = PROMPTS_PER_SEGMENT * POSITIONS * len(base)
    run = con.execute("SELECT max(id) + 1 FROM runs").fetchall()[0][0]  # their own run: the real one's maps stay small
    con.execute("INSERT INTO runs (id, status, pipeline) VALUES (?, 'done', 'bench synthetic')", [run])
    rng = np.random.default_rng(7)
    start = time.perf_counter()
    written = 0
    while written < n_states:
        table = _synthetic_batch(base, next_prompt, next_id, PROMPTS_PER_SEGMENT, rng)
        with in_transaction(con):
            con.execute("INSERT INTO prompts (id, key, run_id, text, source, n_tokens, status, truncated) "
                        "SELECT i, 'synthetic-' || i, ?, 'synthetic prompt ' || i, 'bench', ?, 'done', false "
                        "FROM range(?, ?) t(i)", [run, POSITIONS, next_prompt, next_prompt + PROMPTS_PER_SEGMENT])
            store_segments(con, {"states": table})
        next_prompt += PROMPTS_PER_SEGMENT
        next_id += per_segment
        written += per_segment
    seconds = time.perf_counter() - start
    con.execute("CHECKPOINT")
    shape = {"states": con.execute("SELECT count(*) FROM states").fetchall()[0][0],
             "segments": con.execute("SELECT count(*) FROM internal.segments WHERE table_name = 'states'")
             .fetchall()[0][0], "write_s": seconds, "written": written}
    con.close()
    return shape


def knn_on_store(path: Path, layer: int, queries: int = 200) -> list[Figure]:
    """Nearest neighbours on one layer of the store (index built from the segments): p50, recall@10 vs exact."""
    import faiss

    from geomap.store.vectors import build_state_indexes, open_state_index

    con = connect(path)
    t0 = time.perf_counter()
    build_state_indexes(con, path, layers=[layer])
    build = time.perf_counter() - t0
    index = open_state_index(con, path, layer)
    t0 = time.perf_counter()
    rows = con.execute("SELECT id, vec FROM states WHERE layer = ? ORDER BY id", [layer]).fetchnumpy()
    read = time.perf_counter() - t0
    con.close()
    ids, x = np.asarray(rows["id"]), np.stack(rows["vec"]).astype(np.float32)
    rng = np.random.default_rng(1)
    pick = rng.choice(len(x), queries, replace=False)
    q = x[pick] + rng.standard_normal((queries, x.shape[1]), dtype=np.float32) * (
        0.05 * np.linalg.norm(x[pick], axis=1, keepdims=True) / np.sqrt(x.shape[1]))
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(index.prepare(x))
    truth = ids[exact.search(index.prepare(q), 10)[1]]
    lat, found = [], []
    for row in q:
        t = time.perf_counter()
        found.append(index.search(row[None], 10)[0][0])
        lat.append(time.perf_counter() - t)
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
    inner = index.index.index if hasattr(index.index, "index") else index.index
    note = (f"layer {layer}: {len(x):,} states read from the segments in {read:.1f} s; index built by the store in "
            f"{build:.0f} s ({type(inner).__name__}, nprobe {getattr(inner, 'nprobe', '-')})")
    return [judged("segments store: kNN p50 on one layer's index", median(lat) * 1e3, "ms", "<= 3", note),
            judged("segments store: kNN recall@10", recall, "", ">= 0.95", "against exact inner-product search")]


def segment_figures(loaded, folder: Path, n_states: int = 1_000_000) -> list[Figure]:
    """The query bars of a 1M-state segments store: trajectory SQL, kNN, the journey report; the store is removed."""
    from geomap.bench.query_bench import report_figures, sql_figures
    from geomap.bench.store_bench import fresh_path

    path = folder / "large.duckdb"
    shape = build_large_store(loaded, path, n_states)
    where = f"{shape['states']:,} states in {shape['segments']} states segments"

    def relabel(figs: list[Figure]) -> list[Figure]:
        return [dataclasses.replace(f, name=f"segments store: {f.name}", note=f"{where}; {f.note}".rstrip("; "))
                for f in figs]

    figs = [judged("segments store: synthetic states appended", shape["written"] / shape["write_s"], "states/s",
                   note=f"{where}: two real prompts ingested, the rest synthetic (real states perturbed) written "
                        f"through the segment writer, {PROMPTS_PER_SEGMENT} prompts a segment")]
    figs += relabel(sql_figures(path))
    figs += knn_on_store(path, loaded.anatomy.n_layers // 2)
    figs += relabel([f for f in report_figures(path, loaded) if f.name == "journey report"])
    fresh_path(folder, path.name)
    return figs

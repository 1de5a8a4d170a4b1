"""The measurements behind docs/scaling.md: what stays fast past one DuckDB file, simulated on this machine.

``python -m geomap.bench.scaling knn --sizes 1000000 3000000`` builds FAISS IVF-PQ indexes over synthetic
residual states (real Gemma-3 states perturbed, generated and added in chunks, so only the PQ codes are held) and
times single queries; ``python -m geomap.bench.scaling shards --counts 16 128 1024`` writes Parquet shards of
trajectories and times one prompt's trajectory read by DuckDB, by a glob over every shard and through a catalog
that names the prompt's shard; ``... bytes --db STORE`` splits a real store's bytes per token-layer by table.
Each prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

CHUNK = 65_536


def _chunks(base: np.ndarray, n: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """``n`` synthetic unit states in chunks (``start, array``), the same for the same seed."""
    from geomap.bench.query_bench import synthesise

    for start in range(0, n, CHUNK):
        yield start, synthesise(base, min(CHUNK, n - start), seed=seed * 100_003 + start // CHUNK)


def knn_ivfpq(base: np.ndarray, n: int, codec: str = "PQ64x8", queries: int = 100) -> dict:
    """IVF over ``n`` synthetic states with compressed lists: build time, bytes per state, latency and recall@10.

    ``codec`` is the FAISS factory's list encoding: ``PQ64x8`` (64 bytes a state), ``PQ160x8``, ``SQ8`` (d bytes).
    """
    import faiss

    faiss.omp_set_num_threads(1)  # OpenMP spinning on a shared, oversubscribed machine costs more than it gives
    d = base.shape[1]
    nlist = int(2 ** round(np.log2(np.sqrt(n))))
    index = faiss.index_factory(d, f"IVF{nlist},{codec}", faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(7)
    start = time.perf_counter()
    index.train(next(_chunks(base, min(n, 40 * nlist), seed=99))[1] if 40 * nlist <= CHUNK else
                np.concatenate([c for _, c in _chunks(base, min(n, 40 * nlist), seed=99)]))
    train = time.perf_counter() - start
    qids = np.sort(rng.choice(n, queries, replace=False))
    q = np.empty((queries, d), np.float32)
    truth_d = np.full((queries, 10), -np.inf, np.float32)
    truth_i = np.zeros((queries, 10), np.int64)
    for first, chunk in _chunks(base, n, seed=1):
        index.add_with_ids(chunk, np.arange(first, first + len(chunk), dtype=np.int64))
        inside = (qids >= first) & (qids < first + len(chunk))
        q[inside] = chunk[qids[inside] - first]
        if inside.any():
            q[inside] += rng.standard_normal((inside.sum(), d), dtype=np.float32) * (0.05 / np.sqrt(d))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    build = time.perf_counter() - start
    for first, chunk in _chunks(base, n, seed=1):  # exact truth, chunk by chunk
        sims = q @ chunk.T
        top = np.argpartition(-sims, 10, axis=1)[:, :10]
        cand_d = np.concatenate([truth_d, np.take_along_axis(sims, top, 1)], 1)
        cand_i = np.concatenate([truth_i, top + first], 1)
        keep = np.argsort(-cand_d, 1)[:, :10]
        truth_d, truth_i = np.take_along_axis(cand_d, keep, 1), np.take_along_axis(cand_i, keep, 1)
    out = {"n": n, "d": d, "nlist": nlist, "codec": codec, "train_s": round(train, 1), "build_s": round(build, 1),
           "index_bytes_per_state": round(faiss.serialize_index(index).size / n, 1), "probes": []}
    for nprobe in (16, 32, 64, 128):
        faiss.extract_index_ivf(index).nprobe = nprobe
        lat, r10, r100 = [], [], []
        for row, truth in zip(q, truth_i):
            t0 = time.perf_counter()
            found = index.search(row[None], 100)[1][0]
            lat.append(time.perf_counter() - t0)
            r10.append(len(set(found[:10]) & set(truth)) / 10)
            r100.append(len(set(found) & set(truth)) / 10)
        out["probes"].append({"nprobe": nprobe, "p50_ms": round(float(np.median(lat)) * 1e3, 3),
                              "recall10": round(float(np.mean(r10)), 3),
                              "recall10_in_top100": round(float(np.mean(r100)), 3)})
    faiss.omp_set_num_threads(0)
    return out


def _trajectory(key: str, n_tok: int, n_bound: int, d: int, rng) -> dict:
    layer, pos = np.meshgrid(np.arange(n_bound, dtype=np.int16), np.arange(n_tok, dtype=np.int32), indexing="ij")
    return {"key": [key] * (n_tok * n_bound), "layer": layer.ravel(), "pos": pos.ravel(),
            "vec": rng.standard_normal((n_tok * n_bound, d), dtype=np.float32)}


def shard_sql(counts: list[int], per_shard: int = 2, n_tok: int = 16, n_bound: int = 19, d: int = 640,
              repeats: int = 15) -> list[dict]:
    """One prompt's trajectory from Parquet shards, as the shard count grows: a glob scan against a catalog."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, written, catalog = Path(tmp), 0, []
        for count in sorted(counts):
            write_s = 0.0
            while written < count:
                parts = [_trajectory(f"{rng.integers(2**63):016x}", n_tok, n_bound, d, rng) for _ in range(per_shard)]
                cols = {k: np.concatenate([p[k] for p in parts]) for k in ("key", "layer", "pos")}
                vec = np.concatenate([p["vec"] for p in parts])
                table = pa.table({**cols, "vec": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), d)})
                path = folder / f"shard-{written:05d}.parquet"
                start = time.perf_counter()
                pq.write_table(table, path, compression="zstd", row_group_size=n_tok * n_bound)
                write_s += time.perf_counter() - start
                catalog += [(k, str(path)) for k in dict.fromkeys(cols["key"])]
                written += 1
            con = duckdb.connect()
            con.execute("CREATE TABLE catalog (key VARCHAR PRIMARY KEY, shard VARCHAR)")
            con.executemany("INSERT INTO catalog VALUES (?, ?)", catalog)
            keys = [catalog[i][0] for i in rng.choice(len(catalog), repeats, replace=len(catalog) < repeats)]
            glob, direct = [], []
            for key in keys:
                t0 = time.perf_counter()
                rows = con.execute(f"SELECT layer, pos, vec FROM read_parquet('{folder}/shard-*.parquet') "
                                   "WHERE key = ? ORDER BY layer, pos", [key]).fetchnumpy()
                glob.append(time.perf_counter() - t0)
                assert len(rows["layer"]) == n_tok * n_bound
                t0 = time.perf_counter()
                shard = con.execute("SELECT shard FROM catalog WHERE key = ?", [key]).fetchall()[0][0]
                rows = con.execute("SELECT layer, pos, vec FROM read_parquet(?) WHERE key = ? ORDER BY layer, pos",
                                   [shard, key]).fetchnumpy()
                direct.append(time.perf_counter() - t0)
            con.close()
            size = sum(p.stat().st_size for p in folder.glob("*.parquet"))
            results.append({"shards": count, "prompts": len(catalog), "bytes": size,
                            "write_mb_s": round(size / 2**20 / max(write_s, 1e-9), 1) if count == counts[0] else None,
                            "glob_p50_ms": round(float(np.median(glob)) * 1e3, 2),
                            "catalog_p50_ms": round(float(np.median(direct)) * 1e3, 2)})
    return results


def table_bytes(db: Path) -> dict:
    """A store's tables exported to zstd Parquet: bytes of each, with the prompt, token and token-layer counts."""
    import duckdb

    from geomap.store.writer import TABLES

    con = duckdb.connect(str(db), read_only=True)
    try:
        token_layers = con.execute("SELECT count(*) FROM states").fetchall()[0][0]
        out = {"token_layers": token_layers, "prompts": con.execute("SELECT count(*) FROM prompts").fetchall()[0][0],
               "tokens": con.execute("SELECT count(*) FROM tokens").fetchall()[0][0], "duckdb_file": db.stat().st_size}
        with tempfile.TemporaryDirectory() as tmp:
            for table in TABLES:
                path = Path(tmp) / f"{table}.parquet"
                con.execute(f"COPY {table} TO '{path}' (FORMAT parquet, COMPRESSION zstd)")
                out[table] = path.stat().st_size
    finally:
        con.close()
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: ``knn``, ``shards`` or ``bytes``; one JSON line per measurement."""
    parser = argparse.ArgumentParser(prog="python -m geomap.bench.scaling")
    sub = parser.add_subparsers(dest="what", required=True)
    knn = sub.add_parser("knn")
    knn.add_argument("--db", type=Path, required=True, help="A store of real states (seeds the synthetic ones).")
    knn.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    knn.add_argument("--codec", default="PQ64x8", help="List encoding: PQ64x8, PQ160x8, SQ8, ...")
    shards = sub.add_parser("shards")
    shards.add_argument("--counts", type=int, nargs="+", default=[16, 128, 1024])
    size = sub.add_parser("bytes")
    size.add_argument("--db", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.what == "knn":
        from geomap.bench.query_bench import real_states

        base = real_states(args.db, 9)
        for n in args.sizes:
            print(json.dumps(knn_ivfpq(base, n, args.codec)), flush=True)
    elif args.what == "shards":
        for row in shard_sql(args.counts):
            print(json.dumps(row), flush=True)
    else:
        print(json.dumps(table_bytes(args.db)))


if __name__ == "__main__":
    main()

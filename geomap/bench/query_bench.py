"""Query figures: kNN latency and recall at growing sizes, SQL of one trajectory, reports and projections."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from geomap.bench.core import Figure, judged, median, percentile


def real_states(db_path: Path, layer: int) -> np.ndarray:
    """The stored residuals of one layer, standardised and normalised as the store's indexes hold them."""
    from geomap.store.handle import Store
    from geomap.store.vectors import open_state_index

    with Store.open(db_path, "r") as store, store.snapshot() as con:
        x = np.stack(con.execute("SELECT vec FROM states WHERE layer = ? ORDER BY id", [layer]).fetchnumpy()["vec"])
        index = open_state_index(con, db_path, layer)
    return index.prepare(x.astype(np.float32))


def synthesise(base: np.ndarray, n: int, seed: int = 0, noise: float = 0.35) -> np.ndarray:
    """``n`` unit vectors made by perturbing real ones (each real state seeds a cloud of neighbours)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), np.float32)
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        pick = base[rng.integers(0, len(base), stop - start)]
        jitter = rng.standard_normal(pick.shape, dtype=np.float32) * (noise / np.sqrt(base.shape[1]))
        chunk = pick + jitter
        out[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def knn_figures(base: np.ndarray, sizes: tuple[int, ...], queries: int = 200) -> list[Figure]:
    """IVF (as the store builds it, nprobe calibrated) at each size: single-query p50/p99, recall@10 vs exact."""
    import faiss

    from geomap.store.index_build import choose_nprobe, ivf_lists, new_index
    from geomap.store.vectors import set_parallelism

    figs = []
    for n in sizes:
        x = synthesise(base, n)
        rng = np.random.default_rng(1)
        qids = rng.choice(n, queries, replace=False)
        q = x[qids] + rng.standard_normal((queries, x.shape[1]), dtype=np.float32) * (0.05 / np.sqrt(x.shape[1]))
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        cal = rng.choice(n, 100, replace=False)
        exact = faiss.IndexFlatIP(x.shape[1])  # one exact index: the queries' truth and the calibration's
        exact.add(x)
        truth, cal_truth = exact.search(q, 10)[1], exact.search(x[cal], 11)[1]
        del exact
        index = new_index("ivf", x.shape[1], ivf_lists(n))
        start = time.perf_counter()
        index.train(x[rng.choice(n, min(n, 50 * index.nlist), replace=False)])  # the store trains on 50 per list
        index.add_with_ids(x, np.arange(n, dtype=np.int64))
        build = time.perf_counter() - start
        choose_nprobe(index, x[cal], cal, cal_truth)
        lat, found = [], []
        set_parallelism(index, 1)  # one query at a time, as the store's StateIndex.search does
        for row in q:
            t0 = time.perf_counter()
            found.append(index.search(row[None], 10)[1][0])
            lat.append(time.perf_counter() - t0)
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
        label = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M"
        note = (f"IVF over float16 vectors, {index.nlist} lists, nprobe {index.nprobe} (calibrated as the store "
                f"does), built in "
                f"{build:.0f} s; states synthesised by perturbing real Gemma-3 states")
        big = n >= 1_000_000
        figs += [judged(f"kNN p50 latency at {label} states", median(lat) * 1e3, "ms", "<= 3" if big else None, note),
                 judged(f"kNN p99 latency at {label} states", percentile(lat, 99) * 1e3, "ms"),
                 judged(f"kNN recall@10 at {label} states", recall, "", ">= 0.95" if big else None,
                        "against exact inner-product search")]
        del index, x
    return figs


def sql_figures(db_path: Path, repeats: int = 30) -> list[Figure]:
    """Latency of fetching one prompt's whole trajectory, from an open store (as the server does) and a cold one."""
    from geomap.store.handle import Store
    from geomap.store.sql import run_sql, sql_connection_config

    ids = [r[0] for r in run_sql(db_path, "SELECT id FROM prompts WHERE status = 'done' ORDER BY id").rows]
    view = "SELECT * FROM trajectory WHERE prompt_id = ? ORDER BY pos, layer"
    bare = ("SELECT s.pos, s.layer, s.norm, s.cos_final, l.top1_id, l.top1_prob, l.entropy, l.kl_to_final, "
            "l.final_rank FROM states s LEFT JOIN lens_stats l USING (prompt_id, pos, layer) "
            "WHERE s.prompt_id = ? ORDER BY s.pos, s.layer")
    lat: dict[str, list[float]] = {"view": [], "bare": [], "cold": []}
    with Store.open(db_path, "r", sql_connection_config()) as store:
        for i in range(repeats):
            pid = ids[i % len(ids)]
            for name, sql in (("view", view), ("bare", bare)):
                t0 = time.perf_counter()
                with store.snapshot() as cur:
                    cur.execute(sql, [pid]).fetchall()
                lat[name].append(time.perf_counter() - t0)
    for i in range(min(repeats, 10)):
        t0 = time.perf_counter()
        run_sql(db_path, view, [ids[i % len(ids)]])
        lat["cold"].append(time.perf_counter() - t0)
    return [
        judged("SQL fetch of one trajectory, p50", median(lat["view"]) * 1e3, "ms", "<= 5",
               note="the trajectory view (every position and layer of one prompt, with the lens top-1 token's text) "
                    "on an open store, in a READ ONLY transaction, as geomap serve runs it"),
        judged("SQL fetch of one trajectory without token text, p50", median(lat["bare"]) * 1e3, "ms",
               note="states joined to lens_stats, without the token text"),
        judged("geomap sql fetch of one trajectory, p50", median(lat["cold"]) * 1e3, "ms",
               note="a fresh locked-down connection per query, as the CLI does"),
    ]


def report_figures(db_path: Path, loaded) -> list[Figure]:
    """Time and size of a journey report (the run's maps fitted by the first one) and of the run report."""
    from geomap.report.api import journey_report, run_report

    t0 = time.perf_counter()
    first = journey_report(db_path, 1, loaded=loaded, write=False)
    t1 = time.perf_counter()
    again = journey_report(db_path, 2, loaded=loaded, write=False)
    t2 = time.perf_counter()
    run = run_report(db_path, 1, loaded=loaded, write=False)
    t3 = time.perf_counter()
    return [
        judged("journey report, first of a run", t1 - t0, "s", note="fits and stores the run's PCA map"),
        judged("journey report", t2 - t1, "s", "<= 2",
               note=f"{len(again.html.encode()) / 1e3:.0f} kB with shared assets "
               f"(first: {len(first.html.encode()) / 1e3:.0f} kB)"),
        judged("run report", t3 - t2, "s", note=f"{len(run.html.encode()) / 1e3:.0f} kB"),
    ]


def projection_figures(base: np.ndarray, n: int) -> list[Figure]:
    """PCA and UMAP fit times on ``n`` states (synthesised from real ones when there are fewer)."""
    from geomap.analysis.projection import fit_projection

    x = synthesise(base, n, seed=3)
    out = []
    for method in ("pca", "umap"):
        t0 = time.perf_counter()
        fit_projection(x, method)
        out.append(judged(f"{method.upper()} fit on {n // 1000}k states", time.perf_counter() - t0, "s",
                          note="UMAP on an exact FAISS kNN graph" if method == "umap" else "scikit-learn PCA"))
    return out

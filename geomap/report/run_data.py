"""Gather what the run and compare reports show, as plain JSON-ready dicts."""

from __future__ import annotations

import numpy as np

from geomap.store.db import NotFoundError
from geomap.store.handle import Store, StoreLike


def run_data(store: StoreLike, run_id: int, links=None) -> dict:
    """A whole pipeline run: final-state map, per-layer curves, depth histogram, head entropy, prompt table.

    ``links`` (`geomap.report.links.Links`) names the journey page of each prompt (default: every page, served).
    """
    from geomap.analysis import load
    from geomap.analysis.page_reads import page_keys
    from geomap.analysis.projection import fit_projection
    from geomap.analysis.weights import weights_for
    from geomap.report.links import served

    with Store.use(store, "r") as opened, opened.snapshot() as con:
        runs = con.execute("SELECT model, pipeline, n_layers, n_heads, started_at, status, weights_sha256 FROM runs "
                           "WHERE id = ?",
                           [run_id]).fetchall()
        if not runs:
            raise NotFoundError(f"No run with id {run_id}; list them with `geomap sql \"SELECT * FROM runs\"`.")
        model, pipeline, n_layers, n_heads, started, status, sha = runs[0]
        load.check_stored(con, run_id)
        weights = weights_for(opened.path, sha)
        prompts = con.execute("""SELECT j.prompt_id, j.text, j.tags, j.n_tokens, j.top1_token, j.top1_prob, j.entropy,
                                        j.prediction_depth FROM journey j WHERE j.run_id = ? ORDER BY j.prompt_id""",
                              [run_id]).fetchall()
        curves = con.execute("""SELECT l.layer, avg(l.entropy), avg(l.kl_to_final), avg((l.final_rank = 1)::INT)
                                FROM lens_stats l JOIN prompts p ON p.id = l.prompt_id
                                WHERE p.run_id = ? GROUP BY l.layer ORDER BY l.layer""", [run_id]).fetchall()
        heads = con.execute("""SELECT h.layer, h.head, sum(h.entropy * h.queries) / sum(h.queries)  -- every query
                               FROM head_stats h JOIN prompts p ON p.id = h.prompt_id
                               WHERE p.run_id = ? GROUP BY h.layer, h.head ORDER BY h.layer, h.head""",
                            [run_id]).fetchall()
        finals = load.run_states(con, run_id, [n_layers])
        links = links or served(page_keys(con))
    last = {int(p[0]): int(p[3]) - 1 for p in prompts}
    keep = np.asarray([last.get(int(pid)) == int(pos) for pid, pos in zip(finals.prompt_ids, finals.pos)])
    x = weights.normed(finals.x[keep])
    fit = fit_projection(x, "pca") if len(x) >= 3 else None
    info = {int(p[0]): p for p in prompts}
    points = [] if fit is None else [
        {"x": float(c[0]), "y": float(c[1]), "prompt_id": int(pid), "text": info[int(pid)][1],
         "token": info[int(pid)][4], "tag": (info[int(pid)][2] or [""])[0]}
        for c, pid in zip(fit.coords, finals.prompt_ids[keep])]
    depths = [int(p[7]) for p in prompts if p[7] is not None]
    grid = np.full((n_layers, n_heads), np.nan)
    for layer, head, entropy in heads:
        grid[int(layer), int(head)] = float(entropy)
    return {
        "run": {"id": run_id, "model": model, "pipeline": pipeline, "n_layers": n_layers, "n_heads": n_heads,
                "started": str(started), "status": status, "n_prompts": len(prompts)},
        "prompts": [{"id": int(p[0]), "text": p[1], "tags": list(p[2] or []), "n_tokens": int(p[3]), "token": p[4],
                     "prob": float(p[5]), "entropy": float(p[6]),
                     "depth": None if p[7] is None else int(p[7]), "href": links.journey(int(p[0]))}
                    for p in prompts],
        "curves": [{"layer": int(r[0]), "entropy": float(r[1]), "kl": float(r[2]), "agree": float(r[3])}
                   for r in curves],
        "depth_histogram": [{"depth": d, "count": depths.count(d)} for d in range(n_layers + 1)],
        "head_entropy": [[None if v != v else float(v) for v in row] for row in grid],
        "map": {"points": points, "explained": None if fit is None or fit.explained is None
                else [float(v) for v in fit.explained]},
    }

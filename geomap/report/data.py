"""Gather what a journey report shows, as plain JSON-ready dicts, from the store and the analysis API."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geomap.analysis import load
from geomap.store.db import StoreError, connect, ensure_schema

TEMPERATURE_TOP = 2000  # logits embedded for the in-browser decoding controls
MAP_CANDIDATES = 5  # this position's top candidates whose unembedding directions the trajectory maps show


def _rows(con, sql: str, *params) -> list[tuple]:
    return con.execute(sql, list(params)).fetchall()


def _token_map(con, sha: str, ids) -> dict[int, str]:
    return load.token_texts(con, sha, [int(i) for i in ids])


def journey_data(db_path: str | Path, prompt_id: int, loaded=None, head: tuple[int, int] | None = None,
                 knn: int = 6, pos: int | None = None) -> dict:
    """Everything the journey report of one token shows (default: the prompt's last).

    Args:
        db_path: The store.
        prompt_id: A stored prompt.
        loaded: The model it was captured with (loaded when None).
        head: ``(layer, head)`` for the "inside one head" section (default: the head whose weight on an earlier,
            non-BOS token is largest).
        knn: Neighbours per layer.
        pos: The token's position (a generation's step ``i`` is position ``n_prompt - 1 + i``).
    """
    from geomap.analysis import api
    from geomap.analysis.maps import place, project
    from geomap.analysis.positions_api import position

    con = connect(db_path)
    try:
        ensure_schema(con)
        info = load.prompt_info(con, prompt_id)
        run = _rows(con, "SELECT model, model_type, n_layers, d_model, n_heads, n_kv_heads, head_dim, vocab_size, "
                         "capture_config FROM runs WHERE id = ?", info.run_id)[0]
    finally:
        con.close()
    loaded = api.model_for(info, loaded)
    n, L = info.n_tokens, info.n_layers
    last = load.resolve_pos(info, pos)
    geo_final = api.geometry(db_path, prompt_id, pos=last, loaded=loaded)
    geo_zero = api.geometry(db_path, prompt_id, layer=0, pos=last, loaded=loaded)
    attribution = api.attribute(db_path, prompt_id, pos=last, loaded=loaded)
    stats = api.trajectory_stats(db_path, prompt_id, last)
    pos_frame = position(db_path, prompt_id, max_distance=32, loaded=loaded, pos=last)
    con = connect(db_path)
    try:
        sha = info.weights_sha256
        tokens = [{"pos": p, "id": t, "text": x, "bytes": b.hex(" ") if b else "", "special": s, "generated": g}
                  for p, t, x, b, s, g in _rows(con, "SELECT pos, token_id, text, raw, special, generated FROM tokens "
                                                     "WHERE prompt_id = ? AND pos <= ? ORDER BY pos", prompt_id, last)]
        attn = _rows(con, """SELECT layer, head, scores, weights, entropy, q, k, v, head_out, share_norm
                             FROM attention WHERE prompt_id = ? AND pos = ? ORDER BY layer, head""", prompt_id, last)
        if not attn:
            raise StoreError(f"Prompt {prompt_id} has no attention stored at position {last}; capture it with "
                             "attention there (the last position is captured by default).")
        keys = {(r[0], r[1], r[2]): r for r in _rows(
            con, "SELECT layer, head, pos, k, v FROM attention WHERE prompt_id = ?", prompt_id)}
        contrib = _rows(con, "SELECT layer, attn_norm, mlp_norm FROM contributions WHERE prompt_id = ? AND pos = ? "
                             "ORDER BY layer", prompt_id, last)
        norms = _rows(con, "SELECT n.layer, n.norm, nn.name, n.scale FROM norms n JOIN norm_names nn ON "
                           "nn.model_type = ? AND nn.norm = n.norm WHERE n.prompt_id = ? AND n.pos = ? "
                           "ORDER BY n.layer, n.norm", run[1], prompt_id, last)
        mlp = _rows(con, "SELECT layer, neurons[1:5], activations[1:5] FROM mlp_features WHERE prompt_id = ? AND "
                         "pos = ? ORDER BY layer", prompt_id, last)
        lens = _rows(con, "SELECT layer, token_ids[1:8], probs[1:8] FROM lens WHERE prompt_id = ? AND pos = ? "
                          "ORDER BY layer", prompt_id, last)
        candidates = load.candidates(con, info, last)  # all logits at the last position, else the stored top-k
        decisions = _rows(con, "SELECT id, strategy, temperature, top_k, top_p, min_p, seed, exact, cut_mass, "
                               "len(kept_ids), chosen_id, chosen_rank, chosen_prob, model_prob FROM decisions "
                               "WHERE prompt_id = ? AND pos = ? ORDER BY id", prompt_id, last)
        generations = _rows(con, """SELECT p.id, p.text, d.step, d.chosen_id, d.model_prob, d.strategy, d.pos
                                    FROM prompts p JOIN decisions d ON d.prompt_id = p.id AND d.source = 'generate'
                                    WHERE p.parent_id = ? OR p.id = ? ORDER BY p.id, d.step""", prompt_id, prompt_id)
        projections = _rows(con, "SELECT id, method FROM projections WHERE run_id = ? AND joint AND "
                                 "method IN ('pca', 'umap') ORDER BY id DESC", info.run_id)
        emb_row = loaded.anatomy.embed.weight[int(tokens[-1]["id"])].detach().float().cpu().numpy()
    finally:
        con.close()

    ids = set(int(t) for r in lens for t in r[1]) | {int(r[3]) for r in generations}
    ids |= {int(v) for v in geo_final["id"]} | {int(v) for v in geo_zero["id"]}
    order = np.asarray(candidates.ids[:TEMPERATURE_TOP], dtype=np.int64)
    top_logits = np.asarray(candidates.logits[:TEMPERATURE_TOP], dtype=np.float64)
    ids |= {int(v) for v in order[:50]} | {int(r[10]) for r in decisions}
    texts_con = connect(db_path, read_only=True)
    try:
        texts = _token_map(texts_con, sha, ids | {int(v) for v in order})
    finally:
        texts_con.close()
    # Trajectory maps: the run's joint PCA and UMAP (fitted once per run, stored, and reused by later reports),
    # with this position's top candidates' unembedding directions placed in them.
    maps = {}
    own = [int(t) for t in order[:MAP_CANDIDATES]]
    for method in ("pca", "umap"):
        pid = next((p for p, m in projections if m == method), None)
        if pid is None:
            pid = int(project(db_path, info.run_id, method, loaded=loaded)["projection_id"].iloc[0])
        placed = place(db_path, pid, prompt_id, loaded=loaded, tokens=own)
        maps[method] = _map(db_path, pid, placed, last, texts)

    lse = float(candidates.logsumexp)
    head_layer, head_index = head or _chosen_head(attn, last)
    inside = _inside_head(attn, keys, head_layer, head_index, last, tokens)
    return {
        "prompt": {"id": prompt_id, "text": info.text, "n_tokens": n, "run_id": info.run_id, "pos": last,
                   "is_last": last == n - 1},
        "model": {"name": run[0], "type": run[1], "n_layers": L, "d_model": run[3], "n_heads": run[4],
                  "n_kv_heads": run[5], "head_dim": run[6], "vocab_size": run[7]},
        "tokens": tokens,
        "embedding": {"token": tokens[-1], "row_norm": float(np.linalg.norm(emb_row)),
                      "scale": float(loaded.anatomy.embed_scale), "state_norm": float(stats["norm"].iloc[0]),
                      "neighbours": _frame_rows(geo_zero[geo_zero.role == "embedding"])},
        "position": {"ropes": pos_frame.attrs.get("ropes", {}), "kind": pos_frame.attrs["kind"],
                     "profile": _position_rows(pos_frame, head_layer, head_index)},
        "inside": inside,
        "layers": _layer_rows(attn, contrib, norms, mlp, stats, tokens, last),
        "lens": [{"layer": ell, "top": [{"id": int(t), "token": texts.get(int(t)), "prob": float(p)}
                                        for t, p in zip(tids, probs)],
                  "final_rank": int(stats["final_rank"].iloc[i]) if stats["final_rank"].iloc[i] == stats[
                      "final_rank"].iloc[i] else None}
                 for i, (ell, tids, probs) in enumerate(lens)],
        "stats": {"prediction_depth": stats.attrs["prediction_depth"], "final": stats.attrs["final"],
                  "curves": _frame_rows(stats[["layer", "entropy", "kl_to_final", "norm", "cos_final",
                                               "lens_margin"]])},
        "maps": maps,
        "decoding": {"top": [{"id": int(t), "token": texts.get(int(t)), "logit": float(z),
                              "prob": float(np.exp(z - lse))} for t, z in zip(order, top_logits)],
                     "logsumexp": lse, "vocab_size": int(run[7]), "complete": bool(candidates.complete),
                     "decisions": [dict(zip(("id", "strategy", "temperature", "top_k", "top_p", "min_p", "seed",
                                             "exact", "cut_mass", "kept", "chosen_id", "chosen_rank", "chosen_prob",
                                             "model_prob"), r)) | {"chosen": texts.get(int(r[10]))}
                                   for r in decisions]},
        "geometry": {"attrs": _clean(geo_final.attrs), "rows": _frame_rows(geo_final)},
        "attribution": {"attrs": _clean(attribution.attrs), "rows": [
            {**r, "layer": None if r["layer"] is None else int(r["layer"]),
             "head": None if r["head"] is None else int(r["head"])} for r in _frame_rows(attribution)]},
        "neighbours": _neighbours(db_path, prompt_id, L, knn, last),
        "generations": [{"prompt_id": g, "text": t, "step": s, "id": c, "token": texts.get(int(c)), "prob": p,
                         "strategy": st, "pos": ps} for g, t, s, c, p, st, ps in generations],
    }


def _clean(value):
    """JSON-ready copies of numpy / pandas scalars inside nested containers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if value != value else float(value)
    return value


def _frame_rows(frame) -> list[dict]:
    return [_clean(r) for r in frame.to_dict(orient="records")]


def _chosen_head(attn, last: int) -> tuple[int, int]:
    """The (layer, head) putting the most weight on one earlier non-BOS token at the last position."""
    best, pick = -1.0, (int(attn[0][0]), int(attn[0][1]))
    for layer, head, _, weights, *_ in attn:
        for w in weights[1:last]:
            if w > best:
                best, pick = w, (int(layer), int(head))
    return pick


def _inside_head(attn, keys, layer: int, head: int, last: int, tokens) -> dict:
    row = next(r for r in attn if r[0] == layer and r[1] == head)
    _, _, scores, weights, entropy, q, k_self, v_self, head_out, share_norm = row
    q = np.asarray(q, np.float32)
    per_key = []
    for p in range(last + 1):
        stored = keys.get((layer, head, p))
        k = None if stored is None else np.asarray(stored[3], np.float32)
        v = None if stored is None else np.asarray(stored[4], np.float32)
        per_key.append({"pos": p, "token": tokens[p]["text"], "score": float(scores[p]), "weight": float(weights[p]),
                        "k_norm": None if k is None else float(np.linalg.norm(k)),
                        "v_norm": None if v is None else float(np.linalg.norm(v))})
    top = np.argsort(-np.abs(q))[:5]
    return {"layer": layer, "head": head, "q_norm": float(np.linalg.norm(q)),
            "q_top": [{"dim": int(i), "value": float(q[i])} for i in top], "keys": per_key,
            "entropy": float(entropy), "head_out_norm": float(np.linalg.norm(head_out)),
            "share_norm": float(share_norm), "head_dim": len(q)}


def _position_rows(frame, layer: int, head: int) -> list[dict]:
    if frame.attrs.get("kind") != "rope":
        return _frame_rows(frame)
    rows = frame[(frame["layer"] == layer) & (frame["head"] == head)]
    return _frame_rows(rows[["distance", "score", "key_pos", "captured"]])


def _layer_rows(attn, contrib, norms, mlp, stats, tokens, last) -> list[dict]:
    by_layer: dict[int, dict] = {}
    for layer, head, scores, weights, entropy, *_rest in attn:
        entry = by_layer.setdefault(int(layer), {"layer": int(layer), "heads": []})
        top = int(np.argmax(weights))
        entry["heads"].append({"head": int(head), "scores": [float(s) for s in scores[: last + 1]],
                               "weights": [float(w) for w in weights[: last + 1]], "entropy": float(entropy),
                               "top_pos": top, "top_token": tokens[top]["text"], "top_weight": float(weights[top])})
    for layer, attn_norm, mlp_norm in contrib:
        if int(layer) in by_layer:
            by_layer[int(layer)].update(attn_norm=float(attn_norm), mlp_norm=float(mlp_norm))
    for layer, _, name, scale in norms:
        if int(layer) in by_layer:
            by_layer[int(layer)].setdefault("norms", []).append({"name": name, "scale": float(scale)})
    for layer, neurons, acts in mlp:
        if int(layer) in by_layer:
            by_layer[int(layer)]["mlp_top"] = [{"neuron": int(n), "value": float(a)} for n, a in zip(neurons, acts)]
    for _, row in stats.iterrows():
        ell = int(row["layer"]) - 1  # the boundary after decoder layer ell
        if ell in by_layer:
            by_layer[ell].update(resid_norm=float(row["norm"]), cos_final=float(row["cos_final"]))
    return [by_layer[k] for k in sorted(by_layer)]


def _map(db_path, projection_id: int, placed, last: int, texts: dict[int, str]) -> dict:
    con = connect(db_path, read_only=True)
    try:
        pts = con.execute("""SELECT p.x, p.y, p.layer, p.prompt_id, j.top1_token FROM projection_points p
                             JOIN prompts q ON q.id = p.prompt_id
                             LEFT JOIN journey j ON j.prompt_id = p.prompt_id
                             WHERE p.projection_id = ? AND p.pos = q.n_tokens - 1""", [projection_id]).fetchall()
        toks = con.execute("""SELECT t.x, t.y, v.text, t.token_id FROM projection_tokens t
                              JOIN projections pr ON pr.id = t.projection_id JOIN runs r ON r.id = pr.run_id
                              LEFT JOIN vocab v ON v.weights_sha256 = r.weights_sha256 AND v.token_id = t.token_id
                              WHERE t.projection_id = ?""", [projection_id]).fetchall()
    finally:
        con.close()
    path = placed[placed["pos"] == last].sort_values("layer")
    own = placed.attrs["tokens"]
    mine = {int(t) for t in own["token_id"]}
    return {"projection_id": projection_id, "exact": bool(placed.attrs["exact"]),
            "background": [{"x": float(x), "y": float(y), "layer": int(ell)} for x, y, ell, _, _ in pts],
            "path": [{"x": float(r.x), "y": float(r.y), "layer": int(r.layer)} for r in path.itertuples()],
            "tokens": [{"x": float(r.x), "y": float(r.y), "token": texts.get(int(r.token_id), "?"), "own": True}
                       for r in own.itertuples()]
            + [{"x": float(x), "y": float(y), "token": t, "own": False} for x, y, t, i in toks if int(i) not in mine]}


def _neighbours(db_path, prompt_id: int, n_layers: int, k: int, pos: int) -> list[dict]:
    from geomap.store.query import neighbors

    out = []
    for layer in range(n_layers + 1):
        try:
            frame = neighbors(db_path, prompt_id, layer, pos, k + 1)
        except StoreError:
            continue
        rows = frame[(frame["prompt_id"] != prompt_id) | (frame["pos"] != frame["pos"].iloc[0])].head(k)
        out.append({"layer": layer, "rows": _frame_rows(rows.drop(columns=["state_id"]))})
    return out

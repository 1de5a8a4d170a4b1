"""Gather what a journey report shows, as plain JSON-ready dicts, from the store and the analysis API."""

from __future__ import annotations

import json

import numpy as np
import torch

from geomap.analysis import load
from geomap.analysis.geometry import normed_state
from geomap.analysis.page_reads import page_keys
from geomap.lru import Lru
from geomap.report import decoding_view, geometry_view, head_view, layer_view
from geomap.report.links import Links, served
from geomap.store.db import StoreError, ensure_schema
from geomap.store.handle import Store, StoreLike

TOKEN_WINDOW = 64  # tokens listed around the followed one (long prompts are windowed; see docs/journey.md)
HEAT_WINDOW = 12  # key positions per head in the every-head tables
# The most elements a journey page may have in the browser, whatever the prompt's length (docs/journey.md): the
# windows above bound every per-position table, so a page's size depends on the model's layers and heads only.
ELEMENT_BUDGET = 20_000
NEIGHBOUR_TEXT = 120  # characters of a neighbour's prompt shown
MAP_BACKGROUND = 1500  # other prompts' points drawn at most in the trajectory map
MAP_CANDIDATES = 5  # this position's top candidates whose unembedding directions the trajectory map shows


def _rows(con, sql: str, *params) -> list[tuple]:
    return con.execute(sql, list(params)).fetchall()


def _token_map(con, sha: str, ids) -> dict[int, str]:
    return load.token_texts(con, sha, [int(i) for i in ids])


def journey_data(store: StoreLike, prompt_id: int, loaded=None, head: tuple[int, int] | None = None,
                 knn: int = 6, pos: int | None = None, links: Links | None = None) -> dict:
    """Everything the journey report of one token shows (default: the prompt's last).

    Args:
        store: The store (a path opens one for the call).
        prompt_id: A stored prompt.
        loaded: The model it was captured with (loaded when None).
        head: ``(layer, head)`` opened first in "inside any head" (default: the head whose weight on an earlier,
            non-BOS token is largest).
        knn: Neighbours per layer.
        pos: The token's position (a generation's step ``i`` is position ``n_prompt - 1 + i``).
        links: Which pages the page may link to (default: every page of the store, as served).
    """
    with Store.use(store, "w") as opened:
        return _journey_data(opened, prompt_id, loaded, head, knn, pos, links)


def _journey_data(store: Store, prompt_id: int, loaded, head: tuple[int, int] | None, knn: int, pos: int | None,
                  links: Links | None) -> dict:
    from geomap.analysis import api
    from geomap.analysis.positions_api import position

    with store.writer() as con:
        ensure_schema(con)
        info = load.prompt_info(con, prompt_id)
        run = _rows(con, "SELECT model, model_type, n_layers, d_model, n_heads, n_kv_heads, head_dim, vocab_size, "
                         "capture_config FROM runs WHERE id = ?", info.run_id)[0]
    loaded = api.model_for(info, loaded)
    n, L = info.n_tokens, info.n_layers
    last = load.resolve_pos(info, pos)
    attribution = api.attribute(store, prompt_id, pos=last, loaded=loaded)
    stats = api.trajectory_stats(store, prompt_id, last)
    with store.writer() as con:
        sha = info.weights_sha256
        shown = set(head_view.window(last, TOKEN_WINDOW))
        tokens = [{"pos": p, "id": t, "text": x, "bytes": b.hex(" ") if b else "", "special": s, "generated": g}
                  for p, t, x, b, s, g in _rows(con, "SELECT pos, token_id, text, raw, special, generated FROM tokens "
                                                     "WHERE prompt_id = ? AND pos <= ? ORDER BY pos", prompt_id, last)]
        attn = _rows(con, """SELECT layer, head, scores, weights, entropy, q, k, v, head_out, share_norm, share
                             FROM attention WHERE prompt_id = ? AND pos = ? ORDER BY layer, head""", prompt_id, last)
        if not attn:
            raise StoreError(f"Prompt {prompt_id} has no attention stored at position {last}; capture it with "
                             "attention there (the last position is captured by default).")
        keys_shown = head_view.window(last)
        keys = {(r[0], r[1], r[2]): (r[3], r[4]) for r in _rows(
            con, "SELECT layer, head, pos, k, v FROM attention WHERE prompt_id = ? AND pos IN (SELECT unnest(?))",
            prompt_id, keys_shown)}
        mat_pos = head_view.window(last, head_view.MATRIX_WINDOW)
        matrix: dict = {}
        for layer, h, p, w in _rows(con, "SELECT layer, head, pos, weights FROM attention WHERE prompt_id = ? "
                                         "AND pos IN (SELECT unnest(?))", prompt_id, mat_pos):
            matrix.setdefault((int(layer), int(h)), {})[int(p)] = w
        contrib = _rows(con, "SELECT layer, attn_norm, mlp_norm, attn FROM contributions WHERE prompt_id = ? "
                             "AND pos = ? ORDER BY layer", prompt_id, last)
        norms = _rows(con, "SELECT n.layer, n.norm, nn.name, n.scale FROM norms n JOIN norm_names nn ON "
                           "nn.model_type = ? AND nn.norm = n.norm WHERE n.prompt_id = ? AND n.pos = ? "
                           "ORDER BY n.layer, n.norm", run[1], prompt_id, last)
        mlp = _rows(con, "SELECT layer, neurons[1:3], activations[1:3] FROM mlp_features WHERE prompt_id = ? AND "
                         "pos = ? ORDER BY layer", prompt_id, last)
        lens = _rows(con, "SELECT layer, token_ids[1:8], probs[1:8] FROM lens WHERE prompt_id = ? AND pos = ? "
                          "ORDER BY layer", prompt_id, last)
        candidates = load.candidates(con, info, last)  # all logits at the last position, else the stored top-k
        decisions = _rows(con, "SELECT id, strategy, temperature, top_k, top_p, min_p, seed, exact, cut_mass, "
                               "len(kept_ids), chosen_id, chosen_rank, chosen_prob, model_prob FROM decisions "
                               "WHERE prompt_id = ? AND pos = ? ORDER BY id", prompt_id, last)
        generations = _rows(con, """SELECT p.id, p.text, d.step, d.chosen_id, d.model_prob, d.strategy, d.pos,
                                           p.parent_id
                                    FROM prompts p JOIN decisions d ON d.prompt_id = p.id AND d.source = 'generate'
                                    WHERE p.parent_id = ? OR p.id = ? ORDER BY p.id, d.step""", prompt_id, prompt_id)
        projection = _rows(con, "SELECT id, explained FROM projections WHERE run_id = ? AND joint AND "
                                "method = 'pca' ORDER BY id DESC LIMIT 1", info.run_id)
        final_state = load.state(con, prompt_id, L, last)
        resid = {ell: load.state(con, prompt_id, ell, last) for ell in range(L + 1)}
        nav = _neighbour_prompts(con, info, prompt_id)
        emb_row = loaded.anatomy.embed.weight[int(tokens[-1]["id"])].detach().float().cpu().numpy()

    ids = set(int(t) for r in lens for t in r[1]) | {int(r[3]) for r in generations}
    start = resid[0]
    embed_near = embedding_neighbours(loaded, start)
    ids |= {int(t) for t, _ in embed_near} | {int(r[10]) for r in decisions}
    ids |= {int(v) for v in candidates.ids[:decoding_view.LISTED]}

    def texts_for(extra) -> dict[int, str]:
        with store.snapshot() as c:
            return _token_map(c, sha, extra)

    texts = texts_for(ids)
    normed = normed_state(loaded, final_state)
    geometry = geometry_view.geometry_payload(loaded, normed, candidates.ids, candidates.ids[::-1], texts_for)
    # The trajectory map: the run's joint PCA (fitted once per run, stored, reused), this token's path and its top
    # candidates' unembedding directions placed exactly in it.
    if not projection:
        from geomap.analysis.maps import project

        project(store, info.run_id, "pca", loaded=loaded)
        with store.snapshot() as c:
            projection = _rows(c, "SELECT id, explained FROM projections WHERE run_id = ? AND joint AND "
                                  "method = 'pca' ORDER BY id DESC LIMIT 1", info.run_id)
    pid, explained = projection[0]
    from geomap.analysis.maps import place

    own = [int(t) for t in candidates.ids[:MAP_CANDIDATES]]
    placed = place(store, pid, prompt_id, loaded=loaded, tokens=own, positions=[last])
    pca = _map(store, pid, placed, last, texts)
    pca["explained"] = [float(v) for v in explained or []]

    lse = float(candidates.logsumexp)
    head_layer, head_index = head or _chosen_head(attn, last)
    # The position section draws one head's q·k by distance: only that head is computed.
    pos_frame = position(store, prompt_id, layer=head_layer, head=head_index, max_distance=32, loaded=loaded,
                         pos=last)
    capture = json.loads(run[8]) if run[8] else {}
    fallback = float(run[6]) ** -0.5 if run[6] else 1.0
    heads = head_view.head_payload(attn, keys, {int(c[0]): np.asarray(c[3], np.float64) for c in contrib},
                                   matrix, tokens, last, fallback)
    neurons = layer_view.neuron_rows(loaded, mlp, texts_for)
    heat = set(head_view.window(last, HEAT_WINDOW))
    layers = _layer_rows(attn, contrib, norms, neurons, stats, resid, tokens, last, heat,
                         len(loaded.anatomy.spec.layer_norms))
    view_layers = [{k: v for k, v in row.items() if k != "heads"} for row in layers]
    lens_top1 = [{"layer": ell, "token": texts.get(int(tids[0])) if len(tids) else None,
                  "prob": float(probs[0]) if len(probs) else None} for ell, tids, probs in lens]
    generations = [{"prompt_id": g, "text": t, "step": s, "id": c, "token": texts.get(int(c)), "prob": p,
                    "strategy": st, "pos": ps, "parent_id": par} for g, t, s, c, p, st, ps, par in generations]
    if links is None:
        with store.snapshot() as c:
            links = served(page_keys(c))
    neighbours = _neighbours(store, prompt_id, L, knn, last)
    for block in neighbours:
        for r in block["rows"]:
            r["href"] = links.journey(r["prompt_id"], r["pos"])
    for g in generations:
        g["href"] = links.journey(g["prompt_id"], g["pos"])
    hrefs = {"run": links.run(info.run_id), "parent": nav["parent"] and links.journey(nav["parent"]),
             "prev": nav["prev"] and links.journey(nav["prev"]), "next": nav["next"] and links.journey(nav["next"])}
    return {
        "hrefs": hrefs,
        "prompt": {"id": prompt_id, "text": info.text, "n_tokens": n, "run_id": info.run_id, "pos": last,
                   "is_last": last == n - 1, "shown": len(shown), **nav},
        "model": {"name": run[0], "type": run[1], "n_layers": L, "d_model": run[3], "n_heads": run[4],
                  "n_kv_heads": run[5], "head_dim": run[6], "vocab_size": run[7], "norm_kind":
                  loaded.anatomy.spec.norm_kind},
        "capture": {"attn_positions": capture.get("attn_positions", "last"),
                    "lens_positions": capture.get("lens_positions", "last")},
        "tokens": [t for t in tokens if t["pos"] in shown],
        "heat_tokens": [t for t in tokens if t["pos"] in heat],
        "follow": tokens[-1],
        "embedding": {"token": tokens[-1], "row_norm": float(np.linalg.norm(emb_row)),
                      "scale": float(loaded.anatomy.embed_scale), "state_norm": float(stats["norm"].iloc[0]),
                      "neighbours": [{"rank": i + 1, "token": texts.get(t), "cosine": c}
                                     for i, (t, c) in enumerate(embed_near)]},
        "position": {"ropes": pos_frame.attrs.get("ropes", {}), "kind": pos_frame.attrs["kind"],
                     "profile": _position_rows(pos_frame, head_layer, head_index)},
        "boxes": layer_view.layer_boxes(loaded),
        "head": {"layer": head_layer, "head": head_index},
        "heads": heads,
        "grid": head_view.grid(attn, last, tokens),
        "layers": layers,
        "view_layers": view_layers,
        "lens_top1": lens_top1,
        "lens": [{"layer": ell, "top": [{"id": int(t), "token": texts.get(int(t)), "prob": float(p)}
                                        for t, p in zip(tids, probs)],
                  "final_rank": int(stats["final_rank"].iloc[i]) if stats["final_rank"].iloc[i] == stats[
                      "final_rank"].iloc[i] else None}
                 for i, (ell, tids, probs) in enumerate(lens)],
        "stats": {"prediction_depth": stats.attrs["prediction_depth"], "final": stats.attrs["final"],
                  "curves": _frame_rows(stats[["layer", "entropy", "kl_to_final", "norm", "cos_final",
                                               "lens_margin"]])},
        "maps": {"pca": pca},
        "decoding": decoding_view.decoding_payload(candidates.ids, candidates.logits, texts, lse, int(run[7]),
                                                   bool(candidates.complete))
        | {"decisions": [dict(zip(("id", "strategy", "temperature", "top_k", "top_p", "min_p", "seed", "exact",
                                   "cut_mass", "kept", "chosen_id", "chosen_rank", "chosen_prob", "model_prob"), r))
                         | {"chosen": texts.get(int(r[10]))} for r in decisions]},
        "geometry": geometry,
        "attribution": {"attrs": _clean(attribution.attrs), "rows": [
            {**r, "layer": None if r["layer"] is None else int(r["layer"]),
             "head": None if r["head"] is None else int(r["head"])} for r in _frame_rows(attribution)]},
        "neighbours": neighbours,
        "generations": generations,
    }


def neighbour_layers(n_layers: int) -> list[int]:
    """The boundaries whose FAISS neighbours a journey page lists: five spread over the depth, ends included."""
    return sorted({round(i * n_layers / 4) for i in range(5)})


_ROW_NORMS: Lru[np.ndarray] = Lru(4)  # bounded: the embedding rows' norms of the last models, by weights hash


def embedding_neighbours(loaded, state: np.ndarray, k: int = 10) -> list[tuple[int, float]]:
    """The rows of the embedding matrix nearest by cosine to a layer-0 state: ``(token id, cosine)``, best first.

    One matrix-vector product; the rows' norms are computed once per model and process.
    """
    w_e = loaded.anatomy.embed.weight.detach()
    norms = _ROW_NORMS.get(loaded.weights_hash)
    if norms is None:
        norms = _ROW_NORMS.put(loaded.weights_hash, torch.linalg.vector_norm(w_e.float(), dim=1).cpu().numpy())
    x = torch.as_tensor(np.asarray(state, np.float32)).to(w_e.device, w_e.dtype)
    with torch.no_grad():
        dots = (w_e @ x).float().cpu().numpy()
    cos = dots / np.maximum(norms * float(np.linalg.norm(state)), 1e-30)
    top = np.argpartition(-cos, k)[:k]
    top = top[np.argsort(-cos[top], kind="stable")]
    return [(int(t), float(cos[t])) for t in top]


def _neighbour_prompts(con, info, prompt_id: int) -> dict:
    """The previous and next stored prompts of the same run (not generations), and this prompt's parent."""
    prev = _rows(con, "SELECT max(id) FROM prompts WHERE run_id = ? AND id < ? AND parent_id IS NULL "
                      "AND status = 'done'", info.run_id, prompt_id)[0][0]
    nxt = _rows(con, "SELECT min(id) FROM prompts WHERE run_id = ? AND id > ? AND parent_id IS NULL "
                     "AND status = 'done'", info.run_id, prompt_id)[0][0]
    parent, tags = _rows(con, "SELECT parent_id, tags FROM prompts WHERE id = ?", prompt_id)[0]
    return {"prev": prev, "next": nxt, "parent": parent, "tags": list(tags or [])}


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


def _position_rows(frame, layer: int, head: int) -> list[dict]:
    if frame.attrs.get("kind") != "rope":
        return _frame_rows(frame)
    rows = frame[(frame["layer"] == layer) & (frame["head"] == head)]
    return _frame_rows(rows[["distance", "score", "key_pos", "captured"]])


def _layer_rows(attn, contrib, norms, neurons, stats, resid, tokens, last, shown, n_norms: int) -> list[dict]:
    """Per decoder layer: its heads' weights (drawn window), update norms, norm scales, neurons, residual norms."""
    by_layer: dict[int, dict] = {}
    cols = [p for p in range(last + 1) if p in shown]
    for layer, head, scores, weights, entropy, *_rest in attn:
        entry = by_layer.setdefault(int(layer), {"layer": int(layer), "heads": []})
        top = int(np.argmax(weights[: last + 1]))
        entry["heads"].append({"head": int(head), "scores": [float(scores[p]) for p in cols],
                               "weights": [float(weights[p]) for p in cols], "entropy": float(entropy),
                               "rest": float(sum(weights[: last + 1]) - sum(weights[p] for p in cols)),
                               "top_pos": top, "top_token": tokens[top]["text"], "top_weight": float(weights[top])})
    for layer, attn_norm, mlp_norm, attn_vec in contrib:
        ell = int(layer)
        if ell in by_layer:
            mid = np.asarray(resid[ell], np.float64) + np.asarray(attn_vec, np.float64)
            by_layer[ell].update(attn_norm=float(attn_norm), mlp_norm=float(mlp_norm),
                                 mid_norm=float(np.linalg.norm(mid)))
    for layer, index, name, scale in norms:
        if int(layer) in by_layer:
            by_layer[int(layer)].setdefault("norms", {})[int(index)] = {
                "name": name, "scale": float(scale), "rms": 1.0 / float(scale) if scale else None}
    for layer, rows in neurons.items():
        if layer in by_layer:
            by_layer[layer]["neurons"] = rows
    for _, row in stats.iterrows():
        ell = int(row["layer"]) - 1  # the boundary after decoder layer ell
        if ell in by_layer:
            by_layer[ell].update(resid_norm=float(row["norm"]), cos_final=float(row["cos_final"]))
    for ell, entry in by_layer.items():
        entry["resid_in"] = float(np.linalg.norm(resid[ell])) if ell in resid else None
        entry["norms"] = [entry.get("norms", {}).get(i) for i in range(n_norms)]
    return [by_layer[k] for k in sorted(by_layer)]


def _map(store, projection_id: int, placed, last: int, texts: dict[int, str]) -> dict:
    with store.snapshot() as con:
        pts = con.execute("""SELECT p.x, p.y, p.layer, p.prompt_id, j.top1_token FROM projection_points p
                             JOIN prompts q ON q.id = p.prompt_id
                             LEFT JOIN journey j ON j.prompt_id = p.prompt_id
                             WHERE p.projection_id = ? AND p.pos = q.n_tokens - 1""", [projection_id]).fetchall()
        toks = con.execute("""SELECT t.x, t.y, v.text, t.token_id FROM projection_tokens t
                              JOIN projections pr ON pr.id = t.projection_id JOIN runs r ON r.id = pr.run_id
                              LEFT JOIN vocab v ON v.weights_sha256 = r.weights_sha256 AND v.token_id = t.token_id
                              WHERE t.projection_id = ?""", [projection_id]).fetchall()
    if len(pts) > MAP_BACKGROUND:  # a large run: an even sample of its points
        pts = [pts[i] for i in np.linspace(0, len(pts) - 1, MAP_BACKGROUND).astype(int)]
    path = placed[placed["pos"] == last].sort_values("layer")
    own = placed.attrs["tokens"]
    mine = {int(t) for t in own["token_id"]}
    return {"projection_id": projection_id, "exact": bool(placed.attrs["exact"]),
            "background": [{"x": float(x), "y": float(y), "layer": int(ell)} for x, y, ell, _, _ in pts],
            "path": [{"x": float(r.x), "y": float(r.y), "layer": int(r.layer)} for r in path.itertuples()],
            "tokens": [{"x": float(r.x), "y": float(r.y), "token": texts.get(int(r.token_id), "?"), "own": True}
                       for r in own.itertuples()]
            + [{"x": float(x), "y": float(y), "token": t, "own": False} for x, y, t, i in toks if int(i) not in mine]}


def _neighbours(store, prompt_id: int, n_layers: int, k: int, pos: int) -> list[dict]:
    from geomap.store.query import neighbors

    out = []
    for layer in neighbour_layers(n_layers):
        try:
            frame = neighbors(store, prompt_id, layer, pos, k + 1)
        except StoreError:
            continue
        rows = frame[(frame["prompt_id"] != prompt_id) | (frame["pos"] != frame["pos"].iloc[0])].head(k)
        listed = _frame_rows(rows.drop(columns=["state_id"]))
        for r in listed:  # a long prompt's text once per row would dominate the page
            text = r.get("prompt_text") or ""
            r["prompt_text"] = text if len(text) <= NEIGHBOUR_TEXT else text[: NEIGHBOUR_TEXT - 1] + "…"
        out.append({"layer": layer, "rows": listed})
    return out

"""Gather what a journey page shows: a `JourneyPage` filled by small resolvers that only read.

Each resolver reads its rows through `geomap.analysis.journey_reads` (the SQL lives there) and the model's weight
slice beside the store (`geomap.analysis.weights`); none loads a model and none writes. What a page needs that is
not stored (the weight slice, the run's PCA map) is a precondition: `geomap.report.api.prepare` (the CLI) or the
server's fit queue provides it before rendering.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from geomap.analysis import journey_reads as reads
from geomap.analysis import load, vocab_lookups
from geomap.analysis.page_reads import page_keys
from geomap.analysis.weights import Weights, weights_for
from geomap.report import decoding_view, geometry_view, head_view, layer_view, position_view, strips
from geomap.report.links import Links, served
from geomap.report.shared import PageReads
from geomap.store.db import StoreError
from geomap.store.handle import Store, StoreLike

TOKEN_WINDOW = 64  # tokens listed around the followed one (long prompts are windowed; see docs/journey.md)
HEAT_WINDOW = 12  # key positions per head in the every-head tables
# The most elements a journey page may have in the browser, whatever the prompt's length (docs/journey.md): the
# windows above bound every per-position table, so a page's size depends on the model's layers and heads only.
ELEMENT_BUDGET = 20_000
NEIGHBOUR_TEXT = 120  # characters of a neighbour's prompt shown
MAP_BACKGROUND = 1500  # other prompts' points drawn at most in the trajectory map
MAP_CANDIDATES = 5  # this position's top candidates whose unembedding directions the trajectory map shows


@dataclass
class JourneyPage:
    """Everything one token's journey page shows, one attribute per part of the page (plain, JSON-ready data).

    A new section is a new attribute and a resolver that fills it; ``extra`` holds sections other views add.
    """

    prompt: dict
    model: dict
    architecture: dict
    capture: dict
    hrefs: dict
    tokens: list
    heat_tokens: list
    follow: dict
    embedding: dict
    position: dict
    boxes: list
    head: dict
    heads: dict
    grid: list
    layers: list
    view_layers: list
    lens_top1: list
    lens: list
    stats: dict
    maps: dict
    decoding: dict
    geometry: dict
    attribution: dict
    neighbours: list
    generations: list
    strips: dict = field(default_factory=dict)
    neuron_weak_z: float = 0.0
    extra: dict = field(default_factory=dict)

    def __getitem__(self, key: str):
        """Dictionary-style access, as the templates' other pages use."""
        return getattr(self, key)


@dataclass
class _Context:
    """What every resolver shares: the open connection, the prompt, its run, the followed position, the weights."""

    con: object
    store: Store
    info: load.PromptInfo
    run: reads.RunFacts
    last: int
    weights: Weights
    shared: PageReads = field(default_factory=PageReads)
    texts: dict = field(default_factory=dict)
    _candidates: object = None
    _states: dict | None = None

    def states(self) -> dict:
        """The residual at every boundary at the followed position (read once per page)."""
        if self._states is None:
            self._states = reads.states(self.con, self.info.id, self.info.n_layers, self.last)
        return self._states

    def candidates(self):
        """The followed position's next-token candidates (read and sorted once per page)."""
        if self._candidates is None:
            self._candidates = load.candidates(self.con, self.info, self.last)
        return self._candidates

    def text_of(self, ids) -> dict[int, str]:
        """Token texts, read once per id."""
        todo = {int(i) for i in ids} - set(self.texts)
        if todo:
            self.texts.update(self.shared.token_texts(self.con, self.info.weights_sha256, todo))
        return {int(i): self.texts.get(int(i)) for i in ids}


def journey_data(store: StoreLike, prompt_id: int, head: tuple[int, int] | None = None, knn: int = 6,
                 pos: int | None = None, links: Links | None = None, weights: Weights | None = None,
                 shared: PageReads | None = None) -> JourneyPage:
    """Everything the journey page of one token shows (default: the prompt's last), read from the store only.

    Args:
        store: The store (a path opens one, read-only, for the call).
        prompt_id: A stored prompt.
        head: ``(layer, head)`` opened first in "inside any head" (default: the head whose weight on an earlier,
            non-BOS token is largest).
        knn: Neighbours per layer.
        pos: The token's position (a generation's step ``i`` is position ``n_prompt - 1 + i``).
        links: Which pages the page may link to (default: every page of the store, as served).
        weights: The model's weight slice (default: the one beside the store).
        shared: The reads this page shares with the other pages of its build (default: its own).
    """
    shared = shared or PageReads()
    with Store.use(store, "r") as opened, opened.snapshot() as con:
        info = load.prompt_info(con, prompt_id)
        ctx = _Context(con, opened, info, shared.run_facts(con, info.run_id), load.resolve_pos(info, pos),
                       weights or weights_for(opened.path, info.weights_sha256), shared)
        links = links or served(page_keys(con))
        return _link(_page(ctx, head, knn), ctx, links)


def _page(ctx: _Context, head, knn: int) -> JourneyPage:
    con, info, last = ctx.con, ctx.info, ctx.last
    toks = reads.tokens(con, info.id, last)
    attn = reads.attention_at(con, info.id, last)
    per_layer = reads.layer_rows(con, info.id, last, ctx.run.model_type)
    resid = ctx.states()
    head_layer, head_index = head or head_view.chosen_head(attn, last)
    stats = reads.trajectory(con, info, last)
    heat = set(head_view.window(last, HEAT_WINDOW))
    layers = layer_view.layer_rows(ctx.weights, ctx.text_of, last, attn, per_layer, stats, resid, toks, heat)
    shown = set(head_view.window(last, TOKEN_WINDOW))
    return JourneyPage(
        prompt=_prompt(ctx, len(shown)), model=_model(ctx), architecture=_architecture(ctx),
        capture={"attn_positions": ctx.run.capture.get("attn_positions", "last"),
                 "lens_positions": ctx.run.capture.get("lens_positions", "last")},
        hrefs={}, tokens=[t for t in toks if t["pos"] in shown], heat_tokens=[t for t in toks if t["pos"] in heat],
        follow=toks[-1], embedding=_embedding(ctx, toks[-1], resid[0], stats),
        position=_position(ctx, head_layer, head_index), boxes=layer_view.layer_boxes(ctx.weights.meta),
        head={"layer": head_layer, "head": head_index}, heads=_heads(ctx, attn, per_layer, toks),
        grid=head_view.grid(attn, last, toks), layers=layers,
        view_layers=[{k: v for k, v in row.items() if k != "heads"} for row in layers],
        lens_top1=_lens_top1(ctx, per_layer["lens"]), lens=_lens(ctx, per_layer["lens"], stats),
        stats={"prediction_depth": stats["prediction_depth"], "final": stats["final"], "curves": stats["curves"]},
        maps={"pca": _map(ctx)}, decoding=_decoding(ctx), geometry=_geometry(ctx, resid[info.n_layers]),
        attribution=_attribution(ctx), neighbours=_neighbours(ctx, knn),
        generations=ctx.shared.generations(con, info.id),
        strips=_strips(ctx, toks[-1], attn, per_layer, head_layer, head_index),
        neuron_weak_z=layer_view.weak_z(int(ctx.run.vocab_size)))


def _link(page: JourneyPage, ctx: _Context, links: Links) -> JourneyPage:
    """Fill the page's links (only to pages that are there) and its generation steps' token texts."""
    nav = page.prompt
    texts = ctx.text_of([g["id"] for g in page.generations])
    for g in page.generations:
        g["token"], g["href"] = texts[int(g["id"])], links.journey(g["prompt_id"], g["pos"])
    for block in page.neighbours:
        for r in block["rows"]:
            r["href"] = links.journey(r["prompt_id"], r["pos"])
    page.hrefs = {"run": links.run(ctx.info.run_id),
                  **{k: nav[k] and links.journey(nav[k]) for k in ("parent", "prev", "next")}}
    here = [i for i, g in enumerate(page.generations) if g["prompt_id"] == ctx.info.id and g["pos"] == ctx.last]
    if here:  # a continuation step: its neighbours in the sequence of steps
        i = here[0]
        before = page.generations[i - 1] if i > 0 else None
        after = page.generations[i + 1] if i + 1 < len(page.generations) else None
        page.hrefs["prev_step"] = before and {"href": before["href"], "step": before["step"]}
        page.hrefs["next_step"] = after and {"href": after["href"], "step": after["step"]}
    return page


def _prompt(ctx: _Context, shown: int) -> dict:
    info = ctx.info
    return {"id": info.id, "text": info.text, "n_tokens": info.n_tokens, "run_id": info.run_id, "pos": ctx.last,
            "is_last": ctx.last == info.n_tokens - 1, "shown": shown,
            **ctx.shared.neighbour_prompts(ctx.con, info.run_id, info.id)}


def _model(ctx: _Context) -> dict:
    r, meta = ctx.run, ctx.weights.meta
    return {"name": r.model, "type": r.model_type, "n_layers": ctx.info.n_layers, "d_model": r.d_model,
            "n_heads": r.n_heads, "n_kv_heads": r.n_kv_heads, "head_dim": r.head_dim, "vocab_size": r.vocab_size,
            "norm_kind": meta["norm_kind"]}


def _architecture(ctx: _Context) -> dict:
    """The architecture's facts from the weight slice (config and registry).

    Kinds of layer (sliding or global), RoPE bases, the MLP's activation, q/k norms, the weights' provenance.
    """
    arch = dict(ctx.weights.meta["architecture"])
    kinds = arch["layer_kinds"]
    arch["global_layers"] = [i for i, k in enumerate(kinds) if k == "global"]
    arch["mixed"] = len(set(kinds)) > 1
    bases = {k: (r or {}).get("base") for k, r in zip(kinds, arch["ropes"])}
    arch["global_base"], arch["sliding_base"] = bases.get("global"), bases.get("sliding")
    return arch


def _embedding(ctx: _Context, follow: dict, start: np.ndarray, stats: dict) -> dict:
    w = ctx.weights
    row = np.asarray(w.embed[int(follow["id"])], np.float32)
    if w.array("pos_embed") is None:  # the starting state is the token's row, scaled: kept per token
        near = vocab_lookups.embedding_neighbours(w, int(follow["id"]))
    else:  # a learned position vector was added: this position's own state
        near = embedding_neighbours(w, start)
    texts = ctx.text_of([t for t, _ in near])
    return {"token": follow, "row_norm": float(np.linalg.norm(row)), "scale": float(w.meta["embed_scale"]),
            "state_norm": float(stats["curves"][0]["norm"]),
            "neighbours": [{"rank": i + 1, "token": texts[t], "cosine": c} for i, (t, c) in enumerate(near)]}


def embedding_neighbours(weights: Weights, state: np.ndarray, k: int = 10) -> list[tuple[int, float]]:
    """The embedding rows nearest by cosine to a layer-0 state: ``(token id, cosine)``, best first."""
    dots = np.asarray(weights.embed) @ np.asarray(state, np.float32)
    cos = dots / np.maximum(weights.row_norms() * float(np.linalg.norm(state)), 1e-30)
    top = np.argpartition(-cos, k)[:k]
    top = top[np.argsort(-cos[top], kind="stable")]
    return [(int(t), float(cos[t])) for t in top]


def _position(ctx: _Context, layer: int, head: int) -> dict:
    w = ctx.weights
    if w.rope(0) is None:
        return {"kind": "learned", "ropes": {}, "profile": position_view.learned(w)}
    qk = reads.head_qk(ctx.con, ctx.info.id, layer, head, ctx.last)
    return {"kind": "rope", "ropes": position_view.rope_payload(w, ctx.info.n_layers),
            "profile": position_view.profile(w, qk)}


def _strips(ctx: _Context, follow: dict, attn, per_layer: dict, layer: int, head: int) -> dict:
    """The vectors drawn as colour strips: the embedding row, the opened head's q/k/v, the opened block's stream."""
    resid = ctx.states()
    row = next(r for r in attn if int(r[0]) == layer and int(r[1]) == head)
    weights = np.asarray(row[3][: ctx.last + 1], np.float64)
    key = int(np.argmax(weights))
    kv = reads.key_value(ctx.con, ctx.info.id, layer, head, key)
    attn_vec = next((c[3] for c in per_layer["contrib"] if int(c[0]) == layer), None)
    mid = None if attn_vec is None else np.asarray(resid[layer], np.float32) + np.asarray(attn_vec, np.float32)
    return strips.page_strips(
        np.asarray(ctx.weights.embed[int(follow["id"])], np.float32), resid[0], row[5], *(kv or (None, None)),
        resid[layer], attn_vec, None if mid is None else np.asarray(resid[layer + 1], np.float32) - mid,
        resid[layer + 1], {"layer": layer, "head": head, "key_pos": key})


def _heads(ctx: _Context, attn, per_layer: dict, toks: list) -> dict:
    con, pid, last = ctx.con, ctx.info.id, ctx.last
    keys = reads.keys_values(con, pid, head_view.window(last))
    matrix = reads.weight_rows(con, pid, head_view.window(last, head_view.MATRIX_WINDOW))
    fallback = float(ctx.run.head_dim) ** -0.5 if ctx.run.head_dim else 1.0
    updates = {int(c[0]): np.asarray(c[3], np.float64) for c in per_layer["contrib"]}
    return head_view.head_payload(attn, keys, updates, matrix, toks, last, fallback)


def _lens_top1(ctx: _Context, lens) -> list[dict]:
    texts = ctx.text_of([int(t[0]) for _, t, _ in lens if len(t)])
    return [{"layer": ell, "token": texts.get(int(tids[0])) if len(tids) else None,
             "prob": float(probs[0]) if len(probs) else None} for ell, tids, probs in lens]


def _lens(ctx: _Context, lens, stats: dict) -> list[dict]:
    texts = ctx.text_of({int(t) for _, tids, _ in lens for t in tids})
    ranks = {c["layer"]: c.get("final_rank") for c in stats["curves"]}
    return [{"layer": ell, "top": [{"id": int(t), "token": texts[int(t)], "prob": float(p)}
                                   for t, p in zip(tids, probs)], "final_rank": ranks.get(ell)}
            for ell, tids, probs in lens]


def _decoding(ctx: _Context) -> dict:
    cand = ctx.candidates()
    decisions = reads.decisions(ctx.con, ctx.info.id, ctx.last)
    texts = ctx.text_of([*cand.ids[:decoding_view.LISTED], *(d["chosen_id"] for d in decisions)])
    payload = decoding_view.decoding_payload(cand.ids, cand.logits, texts, float(cand.logsumexp),
                                             int(ctx.run.vocab_size), bool(cand.complete))
    if payload["tail"]:  # name each bin's member, so that any draw is named
        members = ctx.text_of(payload["tail"]["r"])
        payload["tail"]["t"] = [members[int(t)] for t in payload["tail"]["r"]]
    return payload | {"decisions": [d | {"chosen": texts.get(int(d["chosen_id"]))} for d in decisions]}


def _geometry(ctx: _Context, final_state: np.ndarray) -> dict:
    cand = ctx.candidates()
    normed = ctx.weights.normed(final_state)
    return geometry_view.geometry_payload(ctx.weights, normed, cand.ids, cand.ids[::-1], ctx.text_of)


def _attribution(ctx: _Context) -> dict:
    from geomap.analysis.attribution import attribute_weights

    con, info, pos = ctx.con, ctx.info, ctx.last
    token = int(reads.rows(con, "SELECT token_ids[1] FROM next_token WHERE prompt_id = ? AND pos = ?",
                           info.id, pos)[0][0])
    result = attribute_weights(ctx.weights, load.stream_parts(con, info, pos), token)
    rows = [{"level": "head" if c in ("head", "attn_bias") else "layer", "component": c,
             "layer": None if layer is None else int(layer), "head": None if h is None else int(h), "value": v}
            for c, layer, h, v in result.parts]
    attrs = {"token": {"id": token, "token": ctx.text_of([token])[token]}, "logit": result.logit,
             "model_logit": load.stored_logit(con, info, pos, token), "pos": pos, "prompt_id": info.id}
    return {"attrs": attrs, "rows": rows}


def neighbour_layers(n_layers: int) -> list[int]:
    """The boundaries whose FAISS neighbours a journey page lists: five spread over the depth, ends included."""
    return sorted({round(i * n_layers / 4) for i in range(5)})


def _neighbours(ctx: _Context, k: int) -> list[dict]:
    from geomap.store.query import neighbor_rows_by_layer

    out = []
    by_layer = neighbor_rows_by_layer(ctx.store, ctx.info.id, neighbour_layers(ctx.info.n_layers), ctx.last, k + 1)
    for layer, found in by_layer.items():
        if isinstance(found, StoreError):
            continue
        first = found[0]["pos"] if found else None
        listed = [reads.clean({c: v for c, v in r.items() if c != "state_id"}) for r in found
                  if r["prompt_id"] != ctx.info.id or r["pos"] != first][:k]
        for r in listed:  # a long prompt's text once per row would dominate the page
            text = r.get("prompt_text") or ""
            r["prompt_text"] = text if len(text) <= NEIGHBOUR_TEXT else text[: NEIGHBOUR_TEXT - 1] + "…"
        out.append({"layer": layer, "rows": listed})
    return out


def _map(ctx: _Context) -> dict:
    """The run's joint PCA with this token's path and its top candidates' unembedding directions placed in it.

    The map is a precondition, fitted before rendering; the placing is exact (the stored mean and basis).
    """
    from geomap.analysis.projection import place_pca

    found = ctx.shared.pca_projection(ctx.con, ctx.info.run_id)
    if found is None:
        raise StoreError(f"Run {ctx.info.run_id} has no PCA map yet; fit it with `geomap map {ctx.info.run_id}` "
                         "(`geomap report journey` does it first).")
    pid, explained, center, components, token_scale = found
    basis = np.asarray(center, np.float32), np.asarray(components, np.float32)
    states = ctx.states()
    coords = place_pca(ctx.weights.normed(np.stack([states[ell] for ell in sorted(states)])), *basis)
    own = [int(t) for t in ctx.candidates().ids[:MAP_CANDIDATES]]
    rows = ctx.weights.unembed_rows(own)
    dirs = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30) * float(token_scale or 1.0)
    token_xy = place_pca(dirs, *basis) if own else np.zeros((0, 2))
    pts, toks = ctx.shared.map_points(ctx.con, pid)
    if len(pts) > MAP_BACKGROUND:  # a large run: an even sample of its points
        pts = [pts[i] for i in np.linspace(0, len(pts) - 1, MAP_BACKGROUND).astype(int)]
    texts = ctx.text_of(own)
    return {"projection_id": pid, "exact": True, "explained": [float(v) for v in explained or []],
            "background": [{"x": float(x), "y": float(y), "layer": int(ell)} for x, y, ell, _, _ in pts],
            "path": [{"x": float(x), "y": float(y), "layer": ell} for ell, (x, y) in zip(sorted(states), coords)],
            "tokens": [{"x": float(x), "y": float(y), "token": texts.get(t) or "?", "own": True}
                       for t, (x, y) in zip(own, token_xy)]
            + [{"x": float(x), "y": float(y), "token": t, "own": False} for x, y, t, i in toks if int(i) not in own]}

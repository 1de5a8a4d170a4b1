"""The analysis stage's Python API over a store: each function reads, analyses, persists, returns a DataFrame.

`trajectory_stats` lives in `geomap.analysis.stats_api` (no torch) and is re-exported here.

Scalars that describe a whole result (the chosen token, the margin, the logit) travel in ``frame.attrs``.
"""

from __future__ import annotations

import pandas as pd

from geomap.analysis import load
from geomap.analysis.decoding import Strategy, decide
from geomap.analysis.persist import decision_row, insert_rows
from geomap.analysis.stats_api import trajectory_stats
from geomap.store.db import ensure_schema, in_transaction
from geomap.store.handle import Store, StoreLike


def decode(store: StoreLike, prompt_id: int, strategy: Strategy, pos: int | None = None) -> pd.DataFrame:
    """Decide the next token from stored logits (no model rerun) and store the decision in ``decisions``.

    Args:
        store: The store (a path opens one for the call).
        prompt_id: A stored prompt.
        strategy: Greedy, or sampling with temperature / top-k / top-p / min-p and a seed.
        pos: The position whose next token is decided (default: the last, where the full logits are stored).

    Returns:
        The kept candidates (``id, token, prob``), most probable first. ``attrs`` holds ``chosen`` (``id, token,
        rank, prob``), ``exact``, ``cut_mass``, ``tail_mass``, ``strategy``, ``pos`` and ``decision_id``.
    """
    with Store.use(store, "w") as opened, opened.writer() as con:
        ensure_schema(con)
        info = load.prompt_info(con, prompt_id)
        pos = load.resolve_pos(info, pos)
        d = decide(load.candidates(con, info, pos), strategy)
        (decision_id,) = insert_rows(con, "decisions", [decision_row(d, prompt_id, pos, "decode")], with_id=True)
        texts = load.token_texts(con, info.weights_sha256, [*d.kept_ids, d.chosen_id])
    frame = pd.DataFrame({"id": d.kept_ids.astype(int), "token": [texts.get(int(i)) for i in d.kept_ids],
                          "prob": d.kept_probs.astype(float)})
    frame.attrs.update(
        chosen={"id": d.chosen_id, "token": texts.get(d.chosen_id), "rank": d.chosen_rank, "prob": d.chosen_prob,
                "model_prob": d.model_prob},
        exact=d.exact, cut_mass=d.cut_mass, tail_mass=d.tail_mass, strategy=strategy.to_dict(), pos=pos,
        prompt_id=prompt_id, decision_id=decision_id)
    return frame


def model_for(info, loaded=None):
    """The model a stored prompt was captured with: ``loaded`` if its weights match, else loaded by name."""
    from geomap.models import load_model
    from geomap.store.db import StoreError

    loaded = loaded or load_model(info.model)
    if loaded.weights_hash != info.weights_sha256:
        raise StoreError(f"Prompt {info.id} was captured with {info.model} (weights {info.weights_sha256[:12]}), "
                         f"not with the model given ({loaded.name}, weights {loaded.weights_hash[:12]}).")
    return loaded


def model_for_prompt(store: StoreLike, prompt_id: int, loaded=None):
    """The model a stored prompt was captured with (``loaded`` if its weights match, else loaded by name)."""
    with Store.use(store, "r") as opened, opened.snapshot() as con:
        info = load.prompt_info(con, prompt_id)
    return model_for(info, loaded)


def geometry(store: StoreLike, prompt_id: int, layer: int | None = None, pos: int | None = None,
             contrast: tuple[str, ...] = (), k: int = 10, loaded=None) -> pd.DataFrame:
    """The unembedding geometry of a stored state, stored in ``geometry`` and ``margins``.

    Defaults: the final layer, the last position.

    Returns:
        One row per compared token: ``role`` (candidate, contrast, nearest, embedding), ``rank``, ``id``,
        ``token``, ``dot``, ``cosine``. ``attrs`` holds ``margin``, ``direction_dot``, ``bias_diff``, ``top1``,
        ``top2``, ``normed_norm``, ``layer``, ``pos``.
    """
    import numpy as np

    from geomap.analysis.geometry import unembedding_geometry
    from geomap.store.db import StoreError

    with Store.use(store, "w") as opened, opened.writer() as con:
        ensure_schema(con)
        info = load.prompt_info(con, prompt_id)
        pos = load.resolve_pos(info, pos)
        layer = info.n_layers if layer is None else layer
        if not 0 <= layer <= info.n_layers:
            raise StoreError(f"layer must lie in 0..{info.n_layers}, not {layer}")
        loaded = model_for(info, loaded)
        contrast_ids = [load.token_id(con, info.weights_sha256, t) for t in contrast]
        g = unembedding_geometry(loaded, load.state(con, prompt_id, layer, pos), layer, contrast_ids, k)
        rows = []
        for role, block in (("candidate", g.candidates), ("contrast", g.contrast), ("nearest", g.nearest),
                            ("embedding", g.embedding)):
            if block is None:
                continue
            rows += [{"prompt_id": prompt_id, "pos": pos, "layer": layer, "role": role, "rank": r,
                      "token_id": int(t), "dot": float(dv), "cosine": float(c)}
                     for r, (t, dv, c) in enumerate(zip(block.token_ids, block.dot, block.cosine), start=1)]
        with in_transaction(con):
            con.execute("DELETE FROM geometry WHERE prompt_id = ? AND pos = ? AND layer = ?", [prompt_id, pos, layer])
            con.execute("DELETE FROM margins WHERE prompt_id = ? AND pos = ? AND layer = ?", [prompt_id, pos, layer])
            insert_rows(con, "geometry", rows)
            insert_rows(con, "margins", [{"prompt_id": prompt_id, "pos": pos, "layer": layer,
                                          "top1_id": g.top1_id, "top2_id": g.top2_id, "margin": g.margin,
                                          "direction_dot": g.direction_dot, "bias_diff": g.bias_diff,
                                          "normed_norm": float(np.linalg.norm(g.normed))}])
        texts = load.token_texts(con, info.weights_sha256, [r["token_id"] for r in rows] + [g.top1_id, g.top2_id])
    frame = pd.DataFrame([{"role": r["role"], "rank": r["rank"], "id": r["token_id"],
                           "token": texts.get(r["token_id"]), "dot": r["dot"], "cosine": r["cosine"]} for r in rows])
    frame.attrs.update(margin=g.margin, direction_dot=g.direction_dot, bias_diff=g.bias_diff,
                       top1={"id": g.top1_id, "token": texts.get(g.top1_id)},
                       top2={"id": g.top2_id, "token": texts.get(g.top2_id)},
                       normed_norm=float(np.linalg.norm(g.normed)), layer=layer, pos=pos, prompt_id=prompt_id)
    return frame


def attribute(store: StoreLike, prompt_id: int, token: str | None = None, pos: int | None = None,
              loaded=None) -> pd.DataFrame:
    """Direct logit attribution of a token's logit at a stored position, stored in ``attributions``.

    Defaults: the model's top-1 token, the last position.

    Returns:
        One row per part: ``level`` (layer or head), ``component``, ``layer``, ``head``, ``value``. ``attrs`` holds
        ``token`` (``id, token``), ``logit`` (rebuilt from the parts), ``model_logit`` (as captured), ``pos``.
    """
    from geomap.analysis.attribution import attribute as decompose

    with Store.use(store, "w") as opened, opened.writer() as con:
        ensure_schema(con)
        info = load.prompt_info(con, prompt_id)
        pos = load.resolve_pos(info, pos)
        if token is None:
            token_id = int(con.execute("SELECT token_ids[1] FROM next_token WHERE prompt_id = ? AND pos = ?",
                                       [prompt_id, pos]).fetchall()[0][0])
        else:
            token_id = load.token_id(con, info.weights_sha256, token)
        loaded = model_for(info, loaded)
        result = decompose(loaded, load.stream_parts(con, info, pos), token_id)
        rows = [{"prompt_id": prompt_id, "pos": pos, "token_id": token_id,
                 "level": "head" if c in ("head", "attn_bias") else "layer", "component": c, "layer": layer,
                 "head": head, "value": v} for c, layer, head, v in result.parts]
        with in_transaction(con):
            con.execute("DELETE FROM attributions WHERE prompt_id = ? AND pos = ? AND token_id = ?",
                        [prompt_id, pos, token_id])
            insert_rows(con, "attributions", rows)
        model_logit = load.stored_logit(con, info, pos, token_id)
        text = load.token_texts(con, info.weights_sha256, [token_id]).get(token_id)
    frame = pd.DataFrame(rows).drop(columns=["prompt_id", "pos", "token_id"])
    frame.attrs.update(token={"id": token_id, "token": text}, logit=result.logit, model_logit=model_logit, pos=pos,
                       prompt_id=prompt_id)
    return frame


__all__ = ["attribute", "decode", "geometry", "model_for", "model_for_prompt", "trajectory_stats"]

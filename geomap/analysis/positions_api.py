"""The API behind `geomap position`: RoPE angles and q·k by distance from stored attention, or learned positions."""

from __future__ import annotations

import numpy as np
import pandas as pd

from geomap.analysis import load
from geomap.analysis.persist import insert_rows
from geomap.analysis.position import distance_profile, learned_position_similarity, rope_angles
from geomap.store.db import StoreError, ensure_schema, in_transaction
from geomap.store.handle import Store, StoreLike
from geomap.store.scalars import of_prompt


def position(store: StoreLike, prompt_id: int, layer: int | None = None, head: int | None = None,
             key_pos: int | None = None, max_distance: int = 64, loaded=None, pos: int | None = None) -> pd.DataFrame:
    """How position shapes a stored prompt's attention scores; stored in ``rope_angles`` and ``position_scores``.

    For RoPE models, each chosen head's query at ``pos`` (default: the last) and one key (``key_pos``; default:
    the stored key that head attends to most) are moved Δ = 0..``max_distance`` apart. For learned positions
    (GPT-2), the position vectors' norms and mean cosine by distance go to ``position_vectors`` and
    ``position_similarity``.

    Returns:
        RoPE: rows ``layer, head, key_pos, distance, score, captured`` (the captured score at the key's real
        distance, else NaN). Learned: rows ``distance, mean_cosine``. ``attrs`` holds ``kind``, ``q_pos``,
        ``ropes`` ({name: {"pairs", "inv_freq_first", "inv_freq_last"}}).
    """
    from geomap.analysis.api import model_for

    with Store.use(store, "w") as opened, opened.writer() as con:
        ensure_schema(con)
        info = load.prompt_info(con, prompt_id)
        loaded = model_for(info, loaded)
        a = loaded.anatomy
        if a.rope(0) is None:
            return _learned(con, loaded, max_distance)
        q_pos = load.resolve_pos(info, pos)
        attention = of_prompt(con, "attention", prompt_id)
        rows = con.execute(f"""SELECT layer, head, pos, q, k, scores, weights FROM {attention}
                               WHERE prompt_id = ? ORDER BY layer, head, pos""", [prompt_id]).fetchall()
        stored = {(r[0], r[1], r[2]): r for r in rows}
        layers = sorted({r[0] for r in rows if r[2] == q_pos})
        if not layers:
            raise StoreError(f"Prompt {prompt_id} has no attention stored at position {q_pos}.")
        if layer is not None:
            if layer not in layers:
                raise StoreError(f"Layer {layer} has no stored attention for prompt {prompt_id} (stored: {layers}).")
            layers = [layer]
        heads = range(a.n_heads) if head is None else [head]
        if head is not None and not 0 <= head < a.n_heads:
            raise StoreError(f"head must lie in 0..{a.n_heads - 1}, not {head}")
        out, ropes = [], {}
        for ell in layers:
            name, inv_freq, attention_scaling = a.rope(ell)
            inv_freq = inv_freq.detach().float().cpu().numpy()
            ropes[name] = inv_freq
            scaling = float(getattr(a.attn(ell), "scaling", a.head_dim ** -0.5))
            for h in heads:
                _, _, _, q, _, scores, weights = stored[(ell, h, q_pos)]
                keys = [p for p in range(q_pos + 1) if (ell, h, p) in stored]
                kp = key_pos if key_pos is not None else max(keys, key=lambda p: weights[p])
                if (ell, h, kp) not in stored:
                    raise StoreError(f"The key at position {kp} is not stored (attention was captured at {keys}).")
                k = stored[(ell, h, kp)][4]
                profile = distance_profile(np.asarray(q), np.asarray(k), q_pos, kp, inv_freq, scaling, max_distance,
                                           attention_scaling)
                out += [{"layer": ell, "head": h, "key_pos": kp, "distance": dist, "score": float(v),
                         "captured": float(scores[kp]) if dist == q_pos - kp else float("nan")}
                        for dist, v in enumerate(profile)]
        angle_rows = [{"prompt_id": prompt_id, "rope": name, "pos": p, "pair": i, "angle": float(angle)}
                      for name, f in ropes.items()
                      for p, row in enumerate(rope_angles(f, np.arange(info.n_tokens))) for i, angle in enumerate(row)]
        with in_transaction(con):
            con.execute("DELETE FROM rope_angles WHERE prompt_id = ?", [prompt_id])
            for ell in layers:
                con.execute("DELETE FROM position_scores WHERE prompt_id = ? AND layer = ?", [prompt_id, ell])
            insert_rows(con, "rope_angles", angle_rows)
            insert_rows(con, "position_scores", [{"prompt_id": prompt_id, **{k: r[k] for k in (
                "layer", "head", "key_pos", "distance", "score")}} for r in out])
    frame = pd.DataFrame(out)
    frame.attrs.update(kind="rope", q_pos=q_pos, prompt_id=prompt_id, ropes={
        name: {"pairs": len(f), "inv_freq_first": float(f[0]), "inv_freq_last": float(f[-1])}
        for name, f in ropes.items()})
    return frame


def _learned(con, loaded, max_distance: int) -> pd.DataFrame:
    vectors = loaded.anatomy.position_embedding.weight.detach().float().cpu().numpy()
    norms, sims = learned_position_similarity(vectors, max_distance)
    sha = loaded.weights_hash
    with in_transaction(con):
        con.execute("DELETE FROM position_vectors WHERE weights_sha256 = ?", [sha])
        con.execute("DELETE FROM position_similarity WHERE weights_sha256 = ?", [sha])
        insert_rows(con, "position_vectors", [{"weights_sha256": sha, "pos": p, "norm": float(n)}
                                              for p, n in enumerate(norms)])
        insert_rows(con, "position_similarity", [{"weights_sha256": sha, "distance": dist, "mean_cosine": float(v)}
                                                 for dist, v in enumerate(sims)])
    frame = pd.DataFrame({"distance": np.arange(len(sims)), "mean_cosine": sims})
    frame.attrs.update(kind="learned", mean_norm=float(norms.mean()), positions=len(norms))
    return frame

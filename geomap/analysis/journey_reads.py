"""Read what one token's journey page shows from the store, as plain rows: the SQL of the report stage.

Every function takes an open (read-only) connection and returns rows or plain values; nothing here writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import duckdb
import numpy as np

from geomap.analysis import load
from geomap.store.db import StoreError
from geomap.store.scalars import of_prompt


def rows(con: duckdb.DuckDBPyConnection, sql: str, *params) -> list[tuple]:
    """The rows of one query."""
    return con.execute(sql, list(params)).fetchall()


@dataclass(frozen=True)
class RunFacts:
    """The run a prompt was stored by: model, sizes, capture settings."""

    model: str
    model_type: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    capture: dict


def run_facts(con, run_id: int) -> RunFacts:
    """The run's model and capture settings."""
    r = rows(con, "SELECT model, model_type, n_layers, d_model, n_heads, n_kv_heads, head_dim, vocab_size, "
                  "capture_config FROM runs WHERE id = ?", run_id)[0]
    return RunFacts(*r[:8], json.loads(r[8]) if r[8] else {})


def tokens(con, prompt_id: int, last: int) -> list[dict]:
    """The prompt's tokens up to ``last``: ``pos, id, text, bytes, special, generated``."""
    return [{"pos": p, "id": t, "text": x, "bytes": b.hex(" ") if b else "", "special": s, "generated": g}
            for p, t, x, b, s, g in rows(con, "SELECT pos, token_id, text, raw, special, generated FROM tokens "
                                              "WHERE prompt_id = ? AND pos <= ? ORDER BY pos", prompt_id, last)]


def attention_at(con, prompt_id: int, pos: int) -> list[tuple]:
    """Every head's row at the query position.

    Rows ``layer, head, scores, weights, entropy, q, k, v, head_out, share_norm, share``.
    """
    found = rows(con, f"""SELECT layer, head, scores, weights, entropy, q, k, v, head_out, share_norm, share
                          FROM {of_prompt(con, 'attention', prompt_id)} WHERE prompt_id = ? AND pos = ?
                          ORDER BY layer, head""", prompt_id, pos)
    if not found:
        raise StoreError(f"Prompt {prompt_id} has no attention stored at position {pos}; capture it with "
                         "attention there (the last position is captured by default).")
    return found


def keys_values(con, prompt_id: int, positions: list[int]) -> dict:
    """``{(layer, head, pos): (k, v)}`` at the key positions shown."""
    return {(r[0], r[1], r[2]): (r[3], r[4]) for r in rows(
        con, f"SELECT layer, head, pos, k, v FROM {of_prompt(con, 'attention', prompt_id)} WHERE prompt_id = ? "
             "AND pos IN (SELECT unnest(?))", prompt_id, positions)}


def key_value(con, prompt_id: int, layer: int, head: int, pos: int) -> tuple | None:
    """One head's stored k and v at a key position, or None where that position's internals were not captured."""
    found = rows(con, f"SELECT k, v FROM {of_prompt(con, 'attention', prompt_id)} WHERE prompt_id = ? AND "
                      "layer = ? AND head = ? AND pos = ?", prompt_id, layer, head, pos)
    return (found[0][0], found[0][1]) if found and found[0][0] is not None else None


def weight_rows(con, prompt_id: int, positions: list[int]) -> dict:
    """``{(layer, head): {query pos: weights}}`` for the causal matrix's query positions."""
    matrix: dict = {}
    for layer, h, p, w in rows(con, f"SELECT layer, head, pos, weights FROM {of_prompt(con, 'attention', prompt_id)} "
                                    "WHERE prompt_id = ? AND pos IN (SELECT unnest(?))", prompt_id, positions):
        matrix.setdefault((int(layer), int(h)), {})[int(p)] = w
    return matrix


def layer_rows(con, prompt_id: int, pos: int, model_type: str) -> dict:
    """Per layer at one position: its contributions, norm scales, top neurons and lens tokens.

    Keys ``contrib`` (attn/mlp norms, attn vector), ``norms``, ``mlp`` (top neurons), ``lens`` (top tokens).
    """
    return {
        "contrib": rows(con, "SELECT layer, attn_norm, mlp_norm, attn FROM "
                             f"{of_prompt(con, 'contributions', prompt_id)} WHERE prompt_id = ? AND pos = ? "
                             "ORDER BY layer", prompt_id, pos),
        "norms": rows(con, "SELECT n.layer, n.norm, nn.name, n.scale FROM norms n JOIN norm_names nn ON "
                           "nn.model_type = ? AND nn.norm = n.norm WHERE n.prompt_id = ? AND n.pos = ? "
                           "ORDER BY n.layer, n.norm", model_type, prompt_id, pos),
        "mlp": rows(con, "SELECT layer, neurons[1:3], activations[1:3] FROM mlp_features WHERE prompt_id = ? AND "
                         "pos = ? ORDER BY layer", prompt_id, pos),
        "lens": rows(con, "SELECT layer, token_ids[1:8], probs[1:8] FROM lens WHERE prompt_id = ? AND pos = ? "
                          "ORDER BY layer", prompt_id, pos)}


def decisions(con, prompt_id: int, pos: int) -> list[dict]:
    """The decisions stored at a position (decode and generate), oldest first."""
    names = ("id", "strategy", "temperature", "top_k", "top_p", "min_p", "seed", "exact", "cut_mass", "kept",
             "chosen_id", "chosen_rank", "chosen_prob", "model_prob", "source")
    return [dict(zip(names, r)) for r in rows(
        con, "SELECT id, strategy, temperature, top_k, top_p, min_p, seed, exact, cut_mass, len(kept_ids), chosen_id,"
             " chosen_rank, chosen_prob, model_prob, source FROM decisions WHERE prompt_id = ? AND pos = ? ORDER BY id",
        prompt_id, pos)]


def generations(con, prompt_id: int) -> list[dict]:
    """The generation steps of this prompt's generations (or of itself, when it is one)."""
    names = ("prompt_id", "text", "step", "id", "prob", "strategy", "pos", "parent_id")
    return [dict(zip(names, r)) for r in rows(
        con, """SELECT p.id, p.text, d.step, d.chosen_id, d.model_prob, d.strategy, d.pos, p.parent_id
                FROM prompts p JOIN decisions d ON d.prompt_id = p.id AND d.source = 'generate'
                WHERE p.parent_id = ? OR p.id = ? ORDER BY p.id, d.step""", prompt_id, prompt_id)]


def neighbour_prompts(con, run_id: int, prompt_id: int) -> dict:
    """The previous and next stored prompts of the same run (not generations), this prompt's parent and tags."""
    prev = rows(con, "SELECT max(id) FROM prompts WHERE run_id = ? AND id < ? AND parent_id IS NULL "
                     "AND status = 'done'", run_id, prompt_id)[0][0]
    nxt = rows(con, "SELECT min(id) FROM prompts WHERE run_id = ? AND id > ? AND parent_id IS NULL "
                    "AND status = 'done'", run_id, prompt_id)[0][0]
    parent, tags = rows(con, "SELECT parent_id, tags FROM prompts WHERE id = ?", prompt_id)[0]
    return {"prev": prev, "next": nxt, "parent": parent, "tags": list(tags or [])}


def pca_projection(con, run_id: int) -> tuple | None:
    """The run's latest joint PCA map: ``(id, explained, center, components, token_scale)``, or None."""
    found = rows(con, "SELECT id, explained, center, components, token_scale FROM projections WHERE run_id = ? "
                      "AND joint AND method = 'pca' ORDER BY id DESC LIMIT 1", run_id)
    return found[0] if found else None


def map_points(con, projection_id: int) -> tuple[list, list]:
    """A map's points (last positions of the run's prompts) and its placed token directions, in stored order.

    The order is the order they were written in (a join's rows come in any order, and the drawing's label
    placement depends on it: without it a page came out differently from one build to the next).
    """
    pts = rows(con, """SELECT p.x, p.y, p.layer, p.prompt_id, j.top1_token FROM projection_points p
                       JOIN prompts q ON q.id = p.prompt_id
                       LEFT JOIN journey j ON j.prompt_id = p.prompt_id
                       WHERE p.projection_id = ? AND p.pos = q.n_tokens - 1 ORDER BY p.rowid""", projection_id)
    toks = rows(con, """SELECT t.x, t.y, v.text, t.token_id FROM projection_tokens t
                        JOIN projections pr ON pr.id = t.projection_id JOIN runs r ON r.id = pr.run_id
                        LEFT JOIN vocab v ON v.weights_sha256 = r.weights_sha256 AND v.token_id = t.token_id
                        WHERE t.projection_id = ? ORDER BY t.rowid""", projection_id)
    return pts, toks


def head_qk(con, prompt_id: int, layer: int, head: int, q_pos: int) -> dict | None:
    """One head's captured q at ``q_pos`` and the k of the stored key it weighs most (post-norm, post-RoPE)."""
    attention = of_prompt(con, "attention", prompt_id)
    found = rows(con, f"SELECT q, scores, weights FROM {attention} WHERE prompt_id = ? AND layer = ? AND head = ? "
                      "AND pos = ?", prompt_id, layer, head, q_pos)
    if not found:
        return None
    q, scores, weights = found[0]
    keys = {int(p): k for p, k in rows(con, f"SELECT pos, k FROM {attention} WHERE prompt_id = ? AND layer = ? AND "
                                            "head = ? AND pos <= ?", prompt_id, layer, head, q_pos)}
    kp = max(keys, key=lambda p: weights[p])
    return {"layer": layer, "head": head, "q_pos": q_pos, "q": q, "key_pos": kp, "k": keys[kp],
            "captured": scores[kp]}


def states(con, prompt_id: int, n_layers: int, pos: int) -> dict[int, object]:
    """The residual at every boundary 0..n_layers at one position (one query; read twice per page, once here)."""
    from geomap.store.codec import from_blob

    sql = (f"SELECT layer, vec, vec_bf16 FROM {of_prompt(con, 'states', prompt_id)} "  # noqa: S608
           "WHERE prompt_id = ? AND pos = ? AND layer <= ?")
    found = {int(layer): (np.asarray(vec, np.float32) if vec is not None else from_blob(blob))
             for layer, vec, blob in rows(con, sql, prompt_id, pos, n_layers)}
    missing = [ell for ell in range(n_layers + 1) if ell not in found]
    if missing:
        raise StoreError(f"No stored state for prompt {prompt_id} at layer {missing[0]}, position {pos}.")
    return {ell: found[ell] for ell in range(n_layers + 1)}


def clean(value):
    """JSON-ready copies of numpy / pandas scalars inside nested containers (NaN becomes None)."""
    import numpy as np

    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if value != value else float(value)
    return value


def trajectory(con, info: load.PromptInfo, pos: int) -> dict:
    """One position's path through the boundaries (the ``layer_curves`` and ``position_stats`` views).

    Returns:
        ``curves``: per boundary ``layer, top1_id, top1_token, top1_prob, lens_margin, entropy, kl_to_final,
        final_rank, norm, norm_growth, cos_final``; ``prediction_depth``; ``final`` (the model's top-1 ``{id,
        token}``).
    """
    names = ("layer", "top1_id", "top1_token", "top1_prob", "lens_margin", "entropy", "kl_to_final", "final_rank",
             "norm", "norm_growth", "cos_final")
    curves = [clean(dict(zip(names, r))) for r in rows(con, """
        SELECT c.layer, c.top1_id, v.text AS top1_token, l.top1_prob, c.lens_margin, c.entropy, c.kl_to_final,
               c.final_rank, c.norm, c.norm_growth, c.cos_final
        FROM layer_curves c
        LEFT JOIN lens_stats l USING (prompt_id, pos, layer)
        LEFT JOIN vocab v ON v.weights_sha256 = ? AND v.token_id = c.top1_id
        WHERE c.prompt_id = ? AND c.pos = ? ORDER BY c.layer""", info.weights_sha256, info.id, pos)]
    depth = rows(con, "SELECT prediction_depth FROM position_stats WHERE prompt_id = ? AND pos = ?", info.id, pos)
    final = rows(con, "SELECT token_ids[1] FROM next_token WHERE prompt_id = ? AND pos = ?", info.id, pos)[0][0]
    return {"curves": curves, "prediction_depth": depth[0][0] if depth else None,
            "final": {"id": final, "token": load.token_texts(con, info.weights_sha256, [final]).get(final)}}


def page_lookups(con, prompt_ids) -> dict[str, tuple[list, list]]:
    """Per model (weights hash), what these prompts' pages look up over the whole vocabulary.

    The pages are each prompt's last position and its generation steps' positions. Returns ``{weights hash:
    (top neurons as (layer, neuron), followed token ids)}`` (see `geomap.analysis.vocab_lookups`).
    """
    found = rows(con, """
        WITH pages AS (
            SELECT p.id AS prompt_id, p.n_tokens - 1 AS pos, r.weights_sha256 AS sha FROM prompts p
            JOIN runs r ON r.id = p.run_id WHERE p.id IN (SELECT unnest(?))
            UNION SELECT d.prompt_id, d.pos, r.weights_sha256 FROM decisions d JOIN prompts p ON p.id = d.prompt_id
            JOIN runs r ON r.id = p.run_id WHERE d.source = 'generate' AND d.prompt_id IN (SELECT unnest(?)))
        SELECT g.sha, 'n', m.layer, unnest(m.neurons[1:3]) FROM pages g
        JOIN mlp_features m ON m.prompt_id = g.prompt_id AND m.pos = g.pos
        UNION ALL SELECT g.sha, 't', 0, t.token_id FROM pages g
        JOIN tokens t ON t.prompt_id = g.prompt_id AND t.pos = g.pos""", list(prompt_ids), list(prompt_ids))
    out: dict[str, tuple[list, list]] = {}
    for sha, kind, layer, value in found:
        picks, ids = out.setdefault(sha, ([], []))
        (picks.append((int(layer), int(value))) if kind == "n" else ids.append(int(value)))
    return out

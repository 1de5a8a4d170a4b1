"""Journeys → Arrow rows of the store's tables (merged into the store by `geomap.store.shards`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa

from geomap.capture.journey import Journey
from geomap.store.codec import LOGIT_CHUNK, encode_bf16


@dataclass(frozen=True)
class PromptSpec:
    """A prompt to ingest, with where it came from.

    Attributes:
        text: The prompt.
        source: The file it came from, or ``"inline"``.
        source_id: The id the source gave it, if any.
        tags: Free-form labels.
        parent_id: For a generation, the stored prompt it continues.
        decoding: For a generation, the canonical JSON of its decoding settings and seed.
        generated_from: For a generation, the first generated position (earlier ones are the parent's tokens).
    """

    text: str
    source: str = "inline"
    source_id: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    parent_id: int | None = None
    decoding: str | None = None
    generated_from: int | None = None


def prompt_key(model_identity: str, config_json: str, text: str, decoding: str | None = None) -> str:
    """sha256 of (model id + weights hash, canonical capture config JSON, prompt text[, decoding])."""
    payload = json.dumps([model_identity, config_json, text, decoding], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _vectors(x: np.ndarray) -> pa.Array:
    """(n, d) float32 → Arrow fixed-size list (DuckDB FLOAT[d])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[-1])


def _lists(x: np.ndarray, dtype) -> pa.Array:
    """(n, m) → Arrow variable-size lists of length m (DuckDB T[])."""
    x = np.ascontiguousarray(x)
    offsets = np.arange(0, x.size + 1, max(x.shape[-1], 1), dtype=np.int32)[: x.shape[0] + 1]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(x.reshape(-1).astype(dtype)))


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def check_finite(journey: Journey) -> str | None:
    """Why a journey must be refused (NaN or Inf in its states or logits), or None."""
    for name, array in (("residual states", journey.stream.resid), ("attention updates", journey.stream.attn),
                        ("MLP updates", journey.stream.mlp), ("final logits", journey.last_logits)):
        if not np.isfinite(array).all():
            return f"NaN or Inf in the {name} of prompt {journey.text[:60]!r}; nothing of it was stored"
    return None


def journey_tables(j: Journey, prompt_id: int, first_state_id: int, vector_dtype: str,
                   generated_from: int | None = None, vocab_text: np.ndarray | None = None) -> dict[str, pa.Table]:
    """All rows one journey adds, as Arrow tables keyed by table name (columns named as in the schema).

    ``generated_from`` flags the tokens from that position on as generated. ``vocab_text`` (V,) holds the display
    text of every token id, for ``lens_stats.top1_token``; without it that column is null (`write_batch` then fills
    it from the store's vocabulary).
    """
    s, att, n_layers = j.stream, j.attention, j.n_layers
    length, width = s.resid.shape[1], s.resid.shape[2]
    pid = lambda n: pa.array(np.full(n, prompt_id, np.int32))  # noqa: E731
    # states: layer-major, then position
    layer_idx, pos_idx = np.meshgrid(np.arange(n_layers + 1), np.arange(length), indexing="ij")
    flat = s.resid.reshape(-1, width)
    norms = np.linalg.norm(flat, axis=-1)
    final = np.broadcast_to(s.resid[-1], s.resid.shape).reshape(-1, width)
    cos = (flat * final).sum(-1) / np.maximum(norms * np.linalg.norm(final, axis=-1), 1e-30)
    n_states = flat.shape[0]
    bf16 = vector_dtype == "bfloat16"
    states = pa.table({
        "id": pa.array(np.arange(first_state_id, first_state_id + n_states, dtype=np.int64)),
        "prompt_id": pid(n_states), "pos": pa.array(pos_idx.reshape(-1).astype(np.int32)),
        "layer": pa.array(layer_idx.reshape(-1).astype(np.int16)),
        "norm": pa.array(norms.astype(np.float32)), "cos_final": pa.array(cos.astype(np.float32)),
        "vec": pa.nulls(n_states, pa.list_(pa.float32(), width)) if bf16 else _vectors(flat),
        "vec_bf16": pa.array([row.astype("<u2").tobytes() for row in encode_bf16(flat)], pa.binary()) if bf16
        else pa.nulls(n_states, pa.binary()),
    })
    if j.profile == "states":  # the residual stream and the final readout, nothing else
        readout = _readout_tables(j, prompt_id, vocab_text)
        return _flag_generated({"states": states, "tokens": readout["tokens"], "next_token": readout["next_token"]},
                               generated_from, length)
    # contributions, with the W_O bias share at the captured query positions
    c_layer, c_pos = np.meshgrid(np.arange(n_layers), np.arange(length), indexing="ij")
    bias = np.full((n_layers, length, width), np.nan, np.float32)
    bias[np.ix_(att.layers, att.positions)] = att.bias_share
    has_bias = ~np.isnan(bias[..., 0]).reshape(-1)
    contributions = pa.table({
        "prompt_id": pid(n_layers * length), "pos": pa.array(c_pos.reshape(-1).astype(np.int32)),
        "layer": pa.array(c_layer.reshape(-1).astype(np.int16)),
        "attn": _vectors(s.attn.reshape(-1, width)), "mlp": _vectors(s.mlp.reshape(-1, width)),
        "attn_norm": pa.array(np.linalg.norm(s.attn, axis=-1).reshape(-1).astype(np.float32)),
        "mlp_norm": pa.array(np.linalg.norm(s.mlp, axis=-1).reshape(-1).astype(np.float32)),
        "attn_bias": pa.FixedSizeListArray.from_arrays(pa.array(np.nan_to_num(bias).reshape(-1)), width,
                                                       mask=pa.array(~has_bias)),
    })
    tables = {"states": states, "contributions": contributions, **_inside_tables(j, prompt_id), **_readout_tables(
        j, prompt_id, vocab_text)}
    return _flag_generated(tables, generated_from, length)


def _flag_generated(tables: dict[str, pa.Table], generated_from: int | None, length: int) -> dict[str, pa.Table]:
    """Flag the tokens from ``generated_from`` on as generated (a generation's own tokens)."""
    if generated_from is not None:
        flags = pa.array(np.arange(length) >= generated_from)
        tokens = tables["tokens"]
        tables["tokens"] = tokens.set_column(tokens.schema.get_field_index("generated"), "generated", flags)
    return tables


def _inside_tables(j: Journey, prompt_id: int) -> dict[str, pa.Table]:
    att, s = j.attention, j.stream
    n_la, n_q, heads = att.q.shape[0], att.q.shape[1], att.q.shape[2]
    group = heads // max(att.k.shape[2], 1)
    la, hh, qq = np.meshgrid(np.arange(n_la), np.arange(heads), np.arange(n_q), indexing="ij")  # (La, H, Q)
    la, hh, qq = la.reshape(-1), hh.reshape(-1), qq.reshape(-1)
    pos = att.positions[qq] if n_q else qq
    n = len(la)
    kv = hh // group
    attention = pa.table({
        "prompt_id": pa.array(np.full(n, prompt_id, np.int32)), "layer": pa.array(att.layers[la].astype(np.int16)),
        "head": pa.array(hh.astype(np.int16)), "pos": pa.array(pos.astype(np.int32)),
        "scores": _lists(att.scores[la, hh, qq], np.float32), "weights": _lists(att.weights[la, hh, qq], np.float32),
        "entropy": pa.array(_entropy(att.weights[la, hh, qq]).astype(np.float32)),
        "q": _lists(att.q[la, qq, hh], np.float32), "k": _lists(att.k[la, pos, kv], np.float32),
        "v": _lists(att.v[la, pos, kv], np.float32), "head_out": _lists(att.head_out[la, qq, hh], np.float32),
        "share": _vectors(att.head_share[la, qq, hh]),
        "share_norm": pa.array(np.linalg.norm(att.head_share[la, qq, hh], axis=-1).astype(np.float32)),
    })
    n_layers, k_norms, length = s.norm_scale.shape
    nl, nk, npos = np.meshgrid(np.arange(n_layers), np.arange(k_norms), np.arange(length), indexing="ij")
    norms = pa.table({
        "prompt_id": pa.array(np.full(nl.size + length, prompt_id, np.int32)),
        "pos": pa.array(np.concatenate([npos.reshape(-1), np.arange(length)]).astype(np.int32)),
        "layer": pa.array(np.concatenate([nl.reshape(-1), np.full(length, n_layers)]).astype(np.int16)),
        "norm": pa.array(np.concatenate([nk.reshape(-1), np.full(length, k_norms)]).astype(np.int16)),
        "scale": pa.array(np.concatenate([s.norm_scale.reshape(-1), s.final_norm_scale]).astype(np.float32)),
    })
    ml, mq = np.meshgrid(np.arange(n_la), np.arange(n_q), indexing="ij")
    ml, mq = ml.reshape(-1), mq.reshape(-1)
    mlp = pa.table({
        "prompt_id": pa.array(np.full(len(ml), prompt_id, np.int32)),
        "pos": pa.array((att.positions[mq] if n_q else mq).astype(np.int32)),
        "layer": pa.array(att.layers[ml].astype(np.int16)),
        "neurons": _lists(j.mlp.index[ml, mq], np.int32), "activations": _lists(j.mlp.value[ml, mq], np.float32),
    })
    return {"attention": attention, "norms": norms, "mlp_features": mlp}


def _readout_tables(j: Journey, prompt_id: int, vocab_text: np.ndarray | None) -> dict[str, pa.Table]:
    lens = j.lens
    ll, pp = np.meshgrid(np.arange(len(lens.layers)), np.arange(len(lens.positions)), indexing="ij")
    ll, pp = ll.reshape(-1), pp.reshape(-1)
    n = len(ll)
    common = {"prompt_id": pa.array(np.full(n, prompt_id, np.int32)),
              "pos": pa.array(lens.positions[pp].astype(np.int32)), "layer": pa.array(lens.layers[ll].astype(np.int16))}
    lens_t = pa.table({**common, "token_ids": _lists(lens.top.ids[ll, pp], np.int32),
                       "logits": _lists(lens.top.logits[ll, pp], np.float32),
                       "probs": _lists(lens.top.probs[ll, pp], np.float32)})
    stats = pa.table({**common, "top1_id": pa.array(lens.top.ids[ll, pp, 0].astype(np.int32)),
                      "top1_prob": pa.array(lens.top.probs[ll, pp, 0]), "entropy": pa.array(lens.top.entropy[ll, pp]),
                      "logsumexp": pa.array(lens.top.logsumexp[ll, pp]),
                      "kl_to_final": pa.array(lens.kl_to_final[ll, pp]),
                      "final_rank": pa.array(lens.final_rank[ll, pp].astype(np.int32)),
                      "final_prob": pa.array(lens.final_prob[ll, pp]),
                      "top1_token": pa.array(vocab_text[lens.top.ids[ll, pp, 0]] if vocab_text is not None else
                                             [None] * n, pa.string())})
    f, length = j.final, len(j.tokens)
    next_token = pa.table({"prompt_id": pa.array(np.full(length, prompt_id, np.int32)),
                           "pos": pa.array(np.arange(length, dtype=np.int32)),
                           "token_ids": _lists(f.ids, np.int32), "logits": _lists(f.logits, np.float32),
                           "probs": _lists(f.probs, np.float32), "entropy": pa.array(f.entropy),
                           "logsumexp": pa.array(f.logsumexp)})
    final_logits = logit_chunks(j.last_logits, prompt_id)
    t = j.tokens
    tokens = pa.table({"prompt_id": pa.array(np.full(length, prompt_id, np.int32)),
                       "pos": pa.array(np.arange(length, dtype=np.int32)), "token_id": pa.array(t.ids.astype(np.int32)),
                       "text": pa.array(list(t.texts)), "raw": pa.array(list(t.raw), pa.binary()),
                       "special": pa.array(t.special), "generated": pa.array(np.zeros(length, bool))})
    return {"lens": lens_t, "lens_stats": stats, "next_token": next_token, "final_logits": final_logits,
            "tokens": tokens}




def logit_chunks(logits: np.ndarray, prompt_id: int) -> pa.Table:
    """(V,) full-vocabulary logits as ``final_logits`` rows: chunk c holds ids c*4096..c*4096+4095 (NaN past V)."""
    n = -(-len(logits) // LOGIT_CHUNK)
    padded = np.full(n * LOGIT_CHUNK, np.nan, np.float32)
    padded[: len(logits)] = logits
    return pa.table({"prompt_id": pa.array(np.full(n, prompt_id, np.int32)),
                     "chunk": pa.array(np.arange(n, dtype=np.int16)),
                     "logits": pa.FixedSizeListArray.from_arrays(pa.array(padded), LOGIT_CHUNK)})


def vocab_texts(con: duckdb.DuckDBPyConnection, weights_sha256: str, vocab_size: int) -> np.ndarray:
    """(vocab_size,) object array of the stored display text of every token id (None where none is stored)."""
    rows = con.execute("SELECT token_id, text FROM vocab WHERE weights_sha256 = ?", [weights_sha256]).fetchnumpy()
    ids, texts = np.asarray(rows["token_id"]), np.asarray(rows["text"], dtype=object)
    out = np.full(vocab_size, None, dtype=object)
    keep = ids < vocab_size
    out[ids[keep]] = texts[keep]
    return out


TABLES = ("tokens", "states", "contributions", "attention", "norms", "mlp_features", "lens", "lens_stats",
          "next_token", "final_logits")

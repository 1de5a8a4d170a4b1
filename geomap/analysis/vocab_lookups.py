"""Whole-vocabulary lookups on a weight slice, batched and kept beside it.

Two things a journey page shows need a pass over every row of the unembedding: the tokens an MLP neuron pushes up
and down (its output direction read through the final norm and W_U) and the embedding rows nearest to a token's
own. Each costs a (V × d) product per item. `precompute` does them for every item a build's pages show, in one
batched pass, and keeps the answers in ``lookups.json`` beside the slice (`geomap.report.api.prepare` calls it: a
precondition, so rendering reads only the rows a page shows). A page asks `neuron_tokens` / `embedding_neighbours`,
which answer from that file, a per-process cache, or compute what is missing (without writing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from geomap.lru import Lru

NEURON_TOKENS = 4  # tokens listed per direction (up / down) for each neuron
EMBED_NEIGHBOURS = 10  # embedding rows listed beside a token's own
_CHUNK = 48  # directions per product: a (48 × V) float32 block is 50 MB at V = 262k
_BLOCK = 64  # vocabulary entries per block in the top-k screen
FILE = "lookups.json"
# (weights hash) -> {"neurons": {"L.N": [...]}, "embed": {"id": [...]}}: answers shared by every page a process
# renders (a pipeline's reports, the server); bounded to 4 models, each at most its neurons and vocabulary.
_MEMORY: Lru[dict] = Lru(4)


def top_k(x: np.ndarray, k: int) -> np.ndarray:
    """(n, k) column indices of each row's k largest values, largest first.

    A screen first: the k largest values lie in the k blocks (of `_BLOCK` columns) with the largest maxima, so only
    those blocks are sorted. Much cheaper than a partition of whole rows at vocabulary width.
    """
    n, width = x.shape
    k = min(k, width)
    blocks = width // _BLOCK
    if blocks <= k:
        part = np.argpartition(-x, k - 1, axis=1)[:, :k]
    else:
        head = x[:, : blocks * _BLOCK].reshape(n, blocks, _BLOCK)
        best = np.argpartition(-head.max(axis=2), k - 1, axis=1)[:, :k]  # (n, k) blocks
        cols = (best[:, :, None] * _BLOCK + np.arange(_BLOCK)).reshape(n, -1)
        if blocks * _BLOCK < width:  # the ragged end is always a candidate
            end = np.arange(blocks * _BLOCK, width)
            cols = np.concatenate([cols, np.broadcast_to(end, (n, len(end)))], axis=1)
        vals = np.take_along_axis(x, cols, axis=1)
        part = np.take_along_axis(cols, np.argpartition(-vals, k - 1, axis=1)[:, :k], axis=1)
    order = np.argsort(-np.take_along_axis(x, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _stored(weights) -> dict:
    """The lookups kept beside the slice, merged into this process's cache (read once per model and file)."""
    memory = _MEMORY.get_or_put(weights.weights_hash, lambda: {"neurons": {}, "embed": {}, "file": None})
    path = Path(weights.folder) / FILE
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return memory
    if memory["file"] != stamp:
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            kept = {}
        memory["neurons"].update(kept.get("neurons", {}))
        memory["embed"].update(kept.get("embed", {}))
        memory["file"] = stamp
    return memory


def _compute_neurons(weights, picks: list[tuple[int, int]]) -> dict[str, list]:
    """``{"L.N": [up ids, down ids, z up, z down]}``: z is the logit in standard deviations over the vocabulary."""
    out: dict[str, list] = {}
    unembed = np.asarray(weights.unembed)
    for start in range(0, len(picks), _CHUNK):
        chunk = picks[start:start + _CHUNK]
        logits = weights.neuron_directions(chunk) @ unembed.T  # (n, V) float32
        mean = logits.mean(axis=1, dtype=np.float64)
        sd = np.maximum(logits.std(axis=1, dtype=np.float64), 1e-30)
        ups, downs = top_k(logits, NEURON_TOKENS), top_k(-logits, NEURON_TOKENS)
        for i, (layer, neuron) in enumerate(chunk):
            zu = (logits[i, ups[i]].astype(np.float64) - mean[i]) / sd[i]
            zd = (logits[i, downs[i]].astype(np.float64) - mean[i]) / sd[i]
            out[f"{layer}.{neuron}"] = [ups[i].tolist(), downs[i].tolist(), [round(float(v), 4) for v in zu],
                                        [round(float(v), 4) for v in zd]]
    return out


def _compute_embed(weights, token_ids: list[int]) -> dict[str, list]:
    """``{"id": [[token, cosine], ...]}``: the embedding rows nearest (cosine) to each token's own row."""
    out: dict[str, list] = {}
    embed = np.asarray(weights.embed)
    norms = weights.row_norms()
    for start in range(0, len(token_ids), _CHUNK):
        chunk = token_ids[start:start + _CHUNK]
        rows = np.asarray(embed[np.asarray(chunk, np.int64)], np.float32)
        cos = (rows @ embed.T) / np.maximum(norms[None, :] * np.linalg.norm(rows, axis=1)[:, None], 1e-30)
        best = top_k(cos, EMBED_NEIGHBOURS)
        for i, t in enumerate(chunk):
            out[str(t)] = [[int(j), round(float(cos[i, j]), 6)] for j in best[i]]
    return out


def neuron_tokens(weights, picks) -> dict[tuple[int, int], tuple]:
    """Per ``(layer, neuron)``: ``(up ids, down ids, z up, z down)`` (kept, cached or computed now)."""
    memory = _stored(weights)
    keys = {(int(a), int(b)): f"{int(a)}.{int(b)}" for a, b in picks}
    missing = sorted(p for p, key in keys.items() if key not in memory["neurons"])
    if missing:
        memory["neurons"].update(_compute_neurons(weights, missing))
    return {p: tuple(memory["neurons"][key]) for p, key in keys.items()}


def embedding_neighbours(weights, token_id: int) -> list[tuple[int, float]]:
    """The embedding rows nearest by cosine to token ``token_id``'s own: ``(token id, cosine)``, best first."""
    memory = _stored(weights)
    key = str(int(token_id))
    if key not in memory["embed"]:
        memory["embed"].update(_compute_embed(weights, [int(token_id)]))
    return [(int(t), float(c)) for t, c in memory["embed"][key]]


def precompute(weights, picks, token_ids) -> int:
    """Compute what is not yet kept for these neurons and tokens, and keep it beside the slice; how many were new.

    A read-only folder keeps nothing (the answers stay in this process's cache).
    """
    memory = _stored(weights)
    known = {tuple(map(int, k.split("."))) for k in memory["neurons"]}
    new_picks = sorted({(int(a), int(b)) for a, b in picks} - known)
    new_ids = sorted({int(t) for t in token_ids} - {int(k) for k in memory["embed"]})
    if not new_picks and not new_ids:
        return 0
    neurons, embed = _compute_neurons(weights, new_picks), _compute_embed(weights, new_ids)
    path = Path(weights.folder) / FILE
    try:
        kept = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError):
        kept = {}
    kept.setdefault("neurons", {}).update(neurons)
    kept.setdefault("embed", {}).update(embed)
    memory["neurons"].update(neurons)
    memory["embed"].update(embed)
    tmp = path.with_name(f"{FILE}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(kept, separators=(",", ":")), encoding="utf-8")
        tmp.replace(path)
        memory["file"] = path.stat().st_mtime_ns
    except OSError:
        tmp.unlink(missing_ok=True)
    return len(new_picks) + len(new_ids)

"""Read what an analysis needs from a store, as plain data (the store stays upstream of analysis)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import duckdb
import numpy as np

if TYPE_CHECKING:  # both modules import torch, which the store-only readers here (`geomap stats`) never need
    from geomap.analysis.attribution import StreamParts
    from geomap.analysis.decoding import Candidates
from geomap.store.codec import from_blob
from geomap.store.db import NotFoundError, StoreError
from geomap.store.query import final_logit, final_logits
from geomap.store.scalars import of_prompt


@dataclass(frozen=True)
class PromptInfo:
    """One stored prompt and the run that stored it."""

    id: int
    text: str
    n_tokens: int
    run_id: int
    model: str
    weights_sha256: str
    n_layers: int
    capture_config: str


def prompt_info(con: duckdb.DuckDBPyConnection, prompt_id: int) -> PromptInfo:
    """A stored prompt, or a `StoreError` naming the id."""
    rows = con.execute("""SELECT p.id, p.text, p.n_tokens, p.run_id, r.model, r.weights_sha256, r.n_layers,
                                 r.capture_config, p.status, p.error
                          FROM prompts p JOIN runs r ON r.id = p.run_id WHERE p.id = ?""", [prompt_id]).fetchall()
    if not rows:
        raise NotFoundError(f"No stored prompt with id {prompt_id}; list them with "
                         "`geomap sql \"SELECT id, text FROM prompts\"`.")
    *values, status, error = rows[0]
    if status != "done":
        raise StoreError(f"Prompt {prompt_id} was not captured ({error}).")
    return PromptInfo(*values)


def resolve_pos(info: PromptInfo, pos: int | None) -> int:
    """A position of the prompt (default its last; negative counts from the end), checked."""
    pos = info.n_tokens - 1 if pos is None else (pos + info.n_tokens if pos < 0 else pos)
    if not 0 <= pos < info.n_tokens:
        raise StoreError(f"Prompt {info.id} has {info.n_tokens} tokens; position {pos} does not exist.")
    return pos


def candidates(con: duckdb.DuckDBPyConnection, info: PromptInfo, pos: int) -> Candidates:
    """The next-token logits stored at a position, all of them where they are stored, else the top-k.

    All of them: at the last position (``final_logits``) and at a generation step (``step_logits``).
    """
    from geomap.analysis.decoding import Candidates

    full = final_logits(con, info.id) if pos == info.n_tokens - 1 else stored_step_logits(con, info.id, pos)
    if full is not None:
        return Candidates.from_full(full)
    rows = con.execute("SELECT token_ids, logits, logsumexp FROM next_token WHERE prompt_id = ? AND pos = ?",
                       [info.id, pos]).fetchall()
    if not rows:
        raise NotFoundError(f"No next-token distribution stored for prompt {info.id} at position {pos}.")
    ids, logits, lse = rows[0]
    return Candidates(np.asarray(ids, np.int64), np.asarray(logits, np.float32), float(lse), False)


def stored_step_logits(con: duckdb.DuckDBPyConnection, prompt_id: int, pos: int) -> np.ndarray | None:
    """A generation step's full logits (V,) float32, stored with its decision, or None (older stores: none)."""
    if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'step_logits'").fetchall()[0][0]:
        return None  # an older store, not written since: no such table (a failed query would abort a transaction)
    found = con.execute("SELECT logits FROM step_logits WHERE prompt_id = ? AND pos = ? ORDER BY chunk",
                        [prompt_id, pos]).fetchnumpy()
    if not len(found["logits"]):
        return None
    flat = np.concatenate([np.asarray(r, np.float32) for r in found["logits"]])
    finite = np.flatnonzero(~np.isnan(flat))
    return flat[: finite[-1] + 1] if len(finite) else flat[:0]


def token_texts(con: duckdb.DuckDBPyConnection, weights_sha256: str, ids) -> dict[int, str]:
    """Display text of token ids under a model's vocabulary."""
    ids = sorted({int(i) for i in ids})
    if not ids:
        return {}
    rows = con.execute("SELECT token_id, text FROM vocab WHERE weights_sha256 = ? AND token_id IN (SELECT unnest(?))",
                       [weights_sha256, ids]).fetchall()
    return dict(rows)


def token_id(con: duckdb.DuckDBPyConnection, weights_sha256: str, text: str) -> int:
    """The id of a vocabulary entry given its display text (e.g. ``" coming"``), or a clear error."""
    rows = con.execute("SELECT token_id FROM vocab WHERE weights_sha256 = ? AND text = ? ORDER BY token_id",
                       [weights_sha256, text]).fetchall()
    if not rows:
        raise StoreError(f"{text!r} is not a single token of this model's vocabulary (mind the leading space: "
                         f"{' ' + text.strip()!r} and {text.strip()!r} differ).")
    return int(rows[0][0])


def state(con: duckdb.DuckDBPyConnection, prompt_id: int, layer: int, pos: int) -> np.ndarray:
    """The stored residual (d,) of a prompt at a boundary and position."""
    rows = con.execute(f"SELECT vec, vec_bf16 FROM {of_prompt(con, 'states', prompt_id)} "  # noqa: S608
                       "WHERE prompt_id = ? AND layer = ? AND pos = ?", [prompt_id, layer, pos]).fetchall()
    if not rows:
        raise NotFoundError(f"No stored state for prompt {prompt_id} at layer {layer}, position {pos}.")
    vec, blob = rows[0]
    return np.asarray(vec, np.float32) if vec is not None else from_blob(blob)


def stream_parts(con: duckdb.DuckDBPyConnection, info: PromptInfo, pos: int) -> StreamParts:
    """The residual stream's parts at one position, for direct logit attribution."""
    from geomap.analysis.attribution import StreamParts

    contributions, attention = (of_prompt(con, t, info.id) for t in ("contributions", "attention"))
    rows = con.execute(f"SELECT attn, mlp FROM {contributions} WHERE prompt_id = ? AND pos = ? "  # noqa: S608
                       "ORDER BY layer", [info.id, pos]).fetchall()
    heads = con.execute(f"""SELECT a.layer, list(a.share ORDER BY a.head), any_value(c.attn_bias)
                           FROM {attention} a JOIN {contributions} c USING (prompt_id, pos, layer)
                           WHERE a.prompt_id = ? AND a.pos = ? GROUP BY a.layer ORDER BY a.layer""",
                        [info.id, pos]).fetchall()
    scale = con.execute("SELECT scale FROM norms WHERE prompt_id = ? AND pos = ? AND layer = ?",
                        [info.id, pos, info.n_layers]).fetchall()
    if not rows or not scale:
        raise StoreError(f"Prompt {info.id} has no stored contributions or final norm scale at position {pos}.")
    d = len(rows[0][0])
    return StreamParts(
        embed=state(con, info.id, 0, pos),
        attn=np.asarray([r[0] for r in rows], np.float32), mlp=np.asarray([r[1] for r in rows], np.float32),
        head_layers=np.asarray([h[0] for h in heads], np.int64),
        heads=np.asarray([h[1] for h in heads], np.float32).reshape(len(heads), -1, d),
        attn_bias=np.asarray([h[2] for h in heads], np.float32).reshape(len(heads), d),
        final_scale=float(scale[0][0]))


def stored_logit(con: duckdb.DuckDBPyConnection, info: PromptInfo, pos: int, token: int) -> float | None:
    """The model's own logit of ``token`` at ``pos`` as captured (None if not among what was stored)."""
    if pos == info.n_tokens - 1:
        value = final_logit(con, info.id, token)
        if value is not None:
            return value
    rows = con.execute("""SELECT logits[list_position(token_ids, ?)] FROM next_token
                          WHERE prompt_id = ? AND pos = ?""", [token, info.id, pos]).fetchall()
    return float(rows[0][0]) if rows and rows[0][0] is not None else None


@dataclass(frozen=True)
class StateSet:
    """Stored states with their coordinates in the store: ``ids, prompt_ids, pos, layers`` (n,), ``x`` (n, d)."""

    ids: np.ndarray
    prompt_ids: np.ndarray
    pos: np.ndarray
    layers: np.ndarray
    x: np.ndarray


def check_stored(con: duckdb.DuckDBPyConnection, run_id: int) -> None:
    """Raise a one-line `StoreError` if run ``run_id`` stored no prompt (nothing of it to show or analyse)."""
    stored = con.execute("SELECT count(*) FROM prompts WHERE run_id = ? AND status = 'done'", [run_id]).fetchall()
    if not stored[0][0]:
        raise StoreError(f"Run {run_id} stored no prompts (it failed, or every prompt it was given was stored "
                         "before): there is nothing of it to show; `geomap sql \"SELECT * FROM runs\"` lists the runs.")


def run_states(con: duckdb.DuckDBPyConnection, run_id: int, layers: list[int] | None = None) -> StateSet:
    """Every stored state of a run's prompts (at ``layers``, default all), decoded to float32."""
    from geomap.store.codec import decode_bf16

    where = "" if layers is None else f"AND s.layer IN ({', '.join(str(int(x)) for x in layers)})"
    table = con.sql(f"""SELECT s.id, s.prompt_id, s.pos, s.layer, s.vec, s.vec_bf16
                        FROM states s JOIN prompts p ON p.id = s.prompt_id
                        WHERE p.run_id = $run AND p.status = 'done' {where} ORDER BY s.id""",
                    params={"run": run_id}).to_arrow_table()
    n = table.num_rows
    if n == 0:
        check_stored(con, run_id)
        raise StoreError(f"Run {run_id} has no stored states" + ("" if layers is None else f" at layers {layers}"))
    vec = table.column("vec").combine_chunks()
    d = vec.type.list_size
    x = np.zeros((n, d), np.float32)
    valid = ~np.asarray(vec.is_null().to_numpy(zero_copy_only=False))
    if valid.any():
        flat = vec.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        x[valid] = flat.reshape(-1, d) if len(flat) == valid.sum() * d else flat.reshape(n, d)[valid]
    if (~valid).any():
        blobs = table.column("vec_bf16").to_pylist()
        x[~valid] = decode_bf16(np.stack([np.frombuffer(blobs[i], "<u2") for i in np.flatnonzero(~valid)]))
    col = {name: table.column(name).to_numpy() for name in ("id", "prompt_id", "pos", "layer")}
    return StateSet(col["id"].astype(np.int64), col["prompt_id"].astype(np.int64), col["pos"].astype(np.int64),
                    col["layer"].astype(np.int64), x)

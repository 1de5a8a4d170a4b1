"""Read-side helpers over a store: state vectors and nearest stored neighbours."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np

from geomap.lru import Lru
from geomap.store.codec import from_blob
from geomap.store.db import NotFoundError, StoreError
from geomap.store.handle import Store, StoreLike
from geomap.store.scalars import of_prompt, relation

_INDEXES: Lru = Lru(32)  # opened state indexes by file identity (bounded: 32 layers' indexes)

if TYPE_CHECKING:
    import pandas as pd


def state_vector(con, prompt_id: int, layer: int, pos: int | None = None) -> tuple[int, np.ndarray]:
    """The stored residual of a prompt at a layer and position (default: its last), as (state id, vector)."""
    if pos is None:
        rows = con.execute("SELECT n_tokens - 1 FROM prompts WHERE id = ? AND status = 'done'", [prompt_id]).fetchall()
        if not rows:
            raise NotFoundError(f"No stored prompt with id {prompt_id}")
        pos = rows[0][0]
    row = con.execute(f"SELECT id, vec, vec_bf16 FROM {of_prompt(con, 'states', prompt_id)} "  # noqa: S608
                      "WHERE prompt_id = ? AND layer = ? AND pos = ?", [prompt_id, layer, pos]).fetchall()
    if not row:
        raise NotFoundError(f"No stored state for prompt {prompt_id} at layer {layer}, position {pos}")
    state_id, vec, blob = row[0]
    return state_id, (np.asarray(vec, np.float32) if vec is not None else from_blob(blob))


def neighbors(store: StoreLike, prompt_id: int, layer: int, pos: int | None = None, k: int = 10,
              last_only: bool = False) -> pd.DataFrame:
    """The k stored states nearest to one state at the same layer, through its FAISS index, joined back to DuckDB.

    Similarity is the cosine of per-layer standardised residuals (see `geomap.store.vectors`).

    Args:
        store: The store (a path opens one, read-only, for the call).
        prompt_id: The query state's prompt.
        layer: Residual boundary 0..L; neighbours come from the same layer.
        pos: The query state's position (default: the prompt's last).
        k: How many neighbours (at least 1; capped at the states there are to search).
        last_only: Search only the last position of each stored prompt: the nearest prompts rather than
            the nearest contexts.

    Returns:
        Columns ``prompt_id, pos, layer, token, prompt_text, lens_top1, similarity, state_id``, nearest first
        (the query state itself comes first, with similarity 1).
    """
    return _nearest(store, prompt_id, layer, pos, k, last_only, lambda result: result.df())


def _nearest(store: StoreLike, prompt_id: int, layer: int, pos: int | None, k: int, last_only: bool, fetch):
    """The FAISS search of `neighbors`, joined back to DuckDB; ``fetch`` reads the joined result."""
    with Store.use(store, "r") as opened, opened.snapshot() as con:
        scalars = relation(con)  # the states' keys without their vectors: no segment file is opened
        top = con.execute(f"SELECT max(layer) FROM {scalars} WHERE prompt_id = ?",  # noqa: S608
                          [prompt_id]).fetchall()[0][0]
        if top is not None and not 0 <= layer <= top:
            raise StoreError(f"Layer {layer} is outside this store's residual boundaries 0..{top} (the model has "
                             f"{top} layers; 0 is the embedding, {top} the last block's output).")
        _, vec = state_vector(con, prompt_id, layer, pos)
        allowed = None
        if last_only:
            allowed = con.execute(f"""SELECT s.id FROM {scalars} s JOIN prompts p ON p.id = s.prompt_id
                                     WHERE s.layer = ? AND s.pos = p.n_tokens - 1""", [layer]).fetchnumpy()["id"]
        if k < 1:
            raise StoreError(f"k must be at least 1, not {k}.")
        state_index = _state_index(con, opened.path, layer)
        k = min(k, state_index.index.ntotal if allowed is None else len(allowed))  # no more than there are
        ids, sims = state_index.search(vec[None], k, allowed)
        keep = ids[0] >= 0
        result = con.execute(f"""
            WITH h AS (SELECT unnest(?::BIGINT[]) AS state_id, unnest(?::FLOAT[]) AS similarity,
                          unnest(?::INTEGER[]) AS rank)
            SELECT s.prompt_id, s.pos, s.layer, t.text AS token, p.text AS prompt_text, l.top1_token AS lens_top1,
                   h.similarity::FLOAT AS similarity, h.state_id
            FROM h JOIN {scalars} s ON s.id = h.state_id
            JOIN prompts p ON p.id = s.prompt_id
            JOIN tokens t ON t.prompt_id = s.prompt_id AND t.pos = s.pos
            LEFT JOIN lens_stats l ON l.prompt_id = s.prompt_id AND l.pos = s.pos AND l.layer = s.layer
            ORDER BY h.rank""", [ids[0][keep].tolist(), sims[0][keep].tolist(), list(range(int(keep.sum())))])
        return fetch(result)


def neighbor_rows_by_layer(store: StoreLike, prompt_id: int, layers: list[int], pos: int,
                           k: int = 10) -> dict[int, list[dict] | StoreError]:
    """`neighbor_rows` at several layers of one state's position, in one snapshot (what a journey page lists).

    The same rows as one `neighbor_rows` call per layer, from one read of the states, of the manifest and of the
    joined rows. A layer that cannot be searched maps to the `StoreError` its own call would raise.
    """
    from geomap.store.manifest import manifest_rows

    if k < 1:
        raise StoreError(f"k must be at least 1, not {k}.")
    out: dict[int, list[dict] | StoreError] = {}
    with Store.use(store, "r") as opened, opened.snapshot() as con:
        scalars = relation(con)  # the states' keys without their vectors: no segment file is opened
        top = con.execute(f"SELECT max(layer) FROM {scalars} WHERE prompt_id = ?",  # noqa: S608
                          [prompt_id]).fetchall()[0][0]
        vectors = {int(layer): (np.asarray(vec, np.float32) if vec is not None else from_blob(blob))
                   for layer, vec, blob in con.execute(
                       f"SELECT layer, vec, vec_bf16 FROM {of_prompt(con, 'states', prompt_id)} "  # noqa: S608
                       "WHERE prompt_id = ? AND pos = ? AND layer IN (SELECT unnest(?))",
                       [prompt_id, pos, [int(x) for x in layers]]).fetchall()}
        manifest = manifest_rows(con, layers)
        hits: list[tuple[int, list, list]] = []
        for layer in layers:
            try:
                if top is not None and not 0 <= layer <= top:
                    raise StoreError(f"Layer {layer} is outside this store's residual boundaries 0..{top} (the model "
                                     f"has {top} layers; 0 is the embedding, {top} the last block's output).")
                if layer not in vectors:
                    raise NotFoundError(f"No stored state for prompt {prompt_id} at layer {layer}, position {pos}")
                state_index = _state_index(con, opened.path, layer, manifest)
                ids, sims = state_index.search(vectors[layer][None], min(k, state_index.index.ntotal))
            except StoreError as exc:
                out[layer] = exc
                continue
            keep = ids[0] >= 0
            hits.append((layer, ids[0][keep].tolist(), sims[0][keep].tolist()))
            out[layer] = []
        if hits:
            result = con.execute(f"""
                WITH h AS (SELECT unnest(?::BIGINT[]) AS state_id, unnest(?::FLOAT[]) AS similarity,
                              unnest(?::INTEGER[]) AS rank, unnest(?::INTEGER[]) AS query_layer)
                SELECT s.prompt_id, s.pos, s.layer, t.text AS token, p.text AS prompt_text,
                       l.top1_token AS lens_top1, h.similarity::FLOAT AS similarity, h.state_id, h.query_layer
                FROM h JOIN {scalars} s ON s.id = h.state_id
                JOIN prompts p ON p.id = s.prompt_id
                JOIN tokens t ON t.prompt_id = s.prompt_id AND t.pos = s.pos
                LEFT JOIN lens_stats l ON l.prompt_id = s.prompt_id AND l.pos = s.pos AND l.layer = s.layer
                ORDER BY h.query_layer, h.rank""",
                [[i for _, ids, _ in hits for i in ids], [v for _, _, sims in hits for v in sims],
                 [r for _, ids, _ in hits for r in range(len(ids))],
                 [layer for layer, ids, _ in hits for _ in ids]])
            names = [c[0] for c in result.description][:-1]
            for row in result.fetchall():
                out[int(row[-1])].append(dict(zip(names, row[:-1])))
    return out


def _state_index(con, db_path, layer: int, manifest: dict[int, dict] | None = None):
    """`open_state_index`, kept per process while its file and manifest row are unchanged.

    A report build asks the same five layers for every page; opening one re-reads and re-hashes its file. The
    manifest's agreement with the stored states is checked on every call, as opening does (``manifest``: its rows,
    already read in this snapshot).
    """
    from geomap.store.db import index_dir
    from geomap.store.manifest import manifest_rows, stats_problem
    from geomap.store.vectors import open_state_index

    row = (manifest if manifest is not None else manifest_rows(con)).get(layer)
    if row is None or stats_problem(con, row):
        return open_state_index(con, db_path, layer)  # its error names the fix
    try:
        st = (index_dir(Path(db_path)) / row["path"]).stat()
    except OSError:
        return open_state_index(con, db_path, layer)
    key = (str(db_path), layer, row["sha256"], row["ntotal"], st.st_mtime_ns, st.st_size)
    return _INDEXES.get_or_put(key, lambda: open_state_index(con, db_path, layer))


def neighbor_rows(store: StoreLike, prompt_id: int, layer: int, pos: int | None = None, k: int = 10,
                  last_only: bool = False) -> list[dict]:
    """`neighbors` as plain dicts, nearest first (no pandas: what a report page reads)."""
    def rows(result) -> list[dict]:
        names = [c[0] for c in result.description]
        return [dict(zip(names, r)) for r in result.fetchall()]

    return _nearest(store, prompt_id, layer, pos, k, last_only, rows)


def final_logits(con: duckdb.DuckDBPyConnection, prompt_id: int) -> np.ndarray | None:
    """The full-vocabulary logits stored for a prompt's last position, (V,) float32, or None if none are stored.

    They are stored as rows of 4096 token ids (`geomap.store.writer.logit_chunks`); the padding past V is NaN.
    """
    rows = con.execute(f"SELECT logits FROM {of_prompt(con, 'final_logits', prompt_id)} "  # noqa: S608
                       "WHERE prompt_id = ? ORDER BY chunk", [prompt_id]).fetchnumpy()
    if not len(rows["logits"]):
        return None
    flat = np.concatenate([np.asarray(r, np.float32) for r in rows["logits"]])
    finite = np.flatnonzero(~np.isnan(flat))
    return flat[: finite[-1] + 1] if len(finite) else flat[:0]


def final_logit(con: duckdb.DuckDBPyConnection, prompt_id: int, token: int) -> float | None:
    """One token's stored last-position logit (None if none is stored or the id is past the vocabulary)."""
    from geomap.store.codec import LOGIT_CHUNK

    rows = con.execute(f"SELECT logits[? + 1] FROM {of_prompt(con, 'final_logits', prompt_id)} "  # noqa: S608
                       "WHERE prompt_id = ? AND chunk = ?",
                       [token % LOGIT_CHUNK, prompt_id, token // LOGIT_CHUNK]).fetchall()
    value = rows[0][0] if rows else None
    return None if value is None or np.isnan(value) else float(value)

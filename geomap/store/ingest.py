"""Ingestion: capture prompts batch by batch and store each batch in one transaction, resumably.

A prompt whose key is already stored is skipped, so rerunning is idempotent and a killed run resumes where
it stopped: an interrupted batch's transaction never committed, and derived FAISS indexes catch up from
DuckDB at the end of every run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from geomap.capture.config import CaptureConfig
from geomap.capture.engine import iter_capture
from geomap.capture.tokens import describe_tokens
from geomap.models.loading import LoadedModel
from geomap.store.db import connect, defer_checkpoints, ensure_schema
from geomap.store.writer import PromptSpec, prompt_key, vocab_texts, write_batch


@dataclass(frozen=True)
class RunSummary:
    """What one ingestion run did."""

    run_id: int
    stored: int
    skipped: int
    failed: int
    tokens: int
    seconds: float
    failures: tuple[str, ...]


def model_identity(loaded: LoadedModel) -> str:
    """The model part of a prompt key: architecture and weights hash (not the path it was loaded from)."""
    return f"{loaded.anatomy.model_type}:{loaded.weights_hash}"


def ensure_vocab(con, loaded: LoadedModel) -> None:
    """Store the model's vocabulary (id, display text, raw bytes) once per weights hash."""
    sha = loaded.weights_hash
    if con.execute("SELECT count(*) FROM vocab WHERE weights_sha256 = ?", [sha]).fetchall()[0][0]:
        return
    ids = np.arange(loaded.anatomy.vocab_size, dtype=np.int64)
    tokens = describe_tokens(loaded.tokenizer, ids[ids < len(loaded.tokenizer)])
    n = len(tokens)
    table = pa.table({"weights_sha256": pa.array([sha] * n), "token_id": pa.array(tokens.ids.astype(np.int32)),
                      "text": pa.array(list(tokens.texts)), "raw": pa.array(list(tokens.raw), pa.binary()),
                      "special": pa.array(tokens.special)})
    con.register("_geomap_vocab", table)
    con.execute("INSERT INTO vocab SELECT * FROM _geomap_vocab")
    con.unregister("_geomap_vocab")
    a = loaded.anatomy
    names = [*a.spec.layer_norms, "final_norm"]
    con.executemany("INSERT OR IGNORE INTO norm_names VALUES (?, ?, ?)",
                    [(a.model_type, i, name) for i, name in enumerate(names)])


def reserve_run(con, pipeline: str) -> int:
    """Insert a ``queued`` run row (filled in when its ingestion starts) and return its id."""
    run_id = con.execute("SELECT coalesce(max(id), 0) + 1 FROM runs").fetchall()[0][0]
    con.execute("INSERT INTO runs (id, started_at, status, pipeline) VALUES (?, now(), 'queued', ?)",
                [run_id, pipeline])
    return int(run_id)


def _start_run(con, loaded: LoadedModel, config: CaptureConfig, vector_dtype: str, pipeline: str,
               run_id: int | None = None) -> int:
    con.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")  # we hold the write lock
    if run_id is None:
        run_id = con.execute("SELECT coalesce(max(id), 0) + 1 FROM runs").fetchall()[0][0]
    else:
        con.execute("DELETE FROM runs WHERE id = ? AND status = 'queued'", [run_id])
    a = loaded.anatomy
    con.execute(
        "INSERT INTO runs VALUES (?, now(), NULL, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
        [run_id, loaded.name, a.model_type, loaded.weights_hash, str(loaded.dtype).removeprefix("torch."),
         vector_dtype, config.to_json(), pipeline, a.n_layers, a.d_model, a.n_heads, a.n_kv_heads, a.head_dim,
         a.vocab_size])
    return run_id


def ingest(loaded: LoadedModel, prompts: Sequence[PromptSpec], db_path: str | Path,
           config: CaptureConfig | None = None, vector_dtype: str = "float32", batch_size: int = 8,
           pipeline: str = "ingest", progress: bool = True, index: bool = True, run_id: int | None = None,
           on_progress: Callable[[dict], None] | None = None) -> RunSummary:
    """Capture and store prompts; already stored prompts (same key) are skipped.

    Args:
        loaded: The model.
        prompts: Prompts with their provenance.
        db_path: The store's DuckDB file (created if missing).
        config: Capture options.
        vector_dtype: ``"float32"`` or ``"bfloat16"``.
        batch_size: Prompts per forward pass and per transaction.
        pipeline: Name recorded on the run.
        progress: Show a progress bar (prompts/s, tokens/s, ETA) on stderr.
        index: Bring the FAISS indexes up to date at the end.
        run_id: A ``queued`` run row (from `reserve_run`) to fill in, instead of a new run.
        on_progress: Called after every stored batch (and once at the start) with ``run_id, total, stored,
            skipped, failed, tokens``.

    Returns:
        A summary of the run.
    """
    config = config or CaptureConfig()
    start = time.perf_counter()
    db_path = Path(db_path)
    con = connect(db_path)
    try:
        defer_checkpoints(con, db_path)
        ensure_schema(con, loaded.anatomy.d_model)
        ensure_vocab(con, loaded)
        texts = vocab_texts(con, loaded.weights_hash, loaded.anatomy.vocab_size)
        identity, config_json = model_identity(loaded), config.to_json()
        keyed = [(spec, prompt_key(identity, config_json, spec.text)) for spec in prompts]
        stored = {row[0] for row in con.execute("SELECT key FROM prompts").fetchall()}
        todo, seen = [], set(stored)
        for spec, key in keyed:
            if key not in seen:
                todo.append((spec, key))
                seen.add(key)
        run_id = _start_run(con, loaded, config, vector_dtype, pipeline, run_id)
        done = failed = n_tokens = 0
        failures = []

        def report() -> None:
            if on_progress is not None:
                on_progress({"run_id": run_id, "total": len(todo), "stored": done, "skipped": len(keyed) - len(todo),
                             "failed": failed, "tokens": n_tokens})

        report()
        bar = tqdm(total=len(todo), unit="prompt", disable=not progress or not todo, desc=f"run {run_id}",
                   dynamic_ncols=True)
        pending = []
        for index_, result in iter_capture(loaded, [spec.text for spec, _ in todo], config, batch_size):
            spec, key = todo[index_]
            pending.append((index_, spec, key, result))
            if len(pending) >= batch_size or done + failed + len(pending) == len(todo):
                pending.sort(key=lambda item: item[0])  # prompt ids follow input order
                counts = write_batch(con, run_id, vector_dtype, [item[1:] for item in pending], texts)
                for _, spec, _, r in pending:
                    if counts["errors"].get(spec.text):
                        failed += 1
                        failures.append(f"{spec.text[:40]!r}: {counts['errors'][spec.text]}")
                    else:
                        done += 1
                        n_tokens += len(r.tokens)
                bar.update(len(pending))
                report()
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(tok_s=f"{n_tokens / elapsed:.0f}", rows=counts.get("states", 0))
                pending = []
        bar.close()
        if index:
            from geomap.store.vectors import sync_state_indexes

            sync_state_indexes(con, db_path)
        con.execute("UPDATE runs SET status = 'done', finished_at = now() WHERE id = ?", [run_id])
        return RunSummary(run_id, done, len(keyed) - len(todo), failed, n_tokens, time.perf_counter() - start,
                          tuple(failures))
    finally:
        con.close()


def summary_json(summary: RunSummary) -> str:
    """A run summary as JSON."""
    return json.dumps(summary.__dict__)

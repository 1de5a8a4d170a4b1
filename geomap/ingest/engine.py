"""Ingestion: capture prompts batch by batch and store each batch in one transaction, resumably.

A prompt whose key is already stored is skipped, so rerunning is idempotent and a killed run resumes where
it stopped: an interrupted batch's transaction never committed, and derived FAISS indexes catch up from
DuckDB at the end of every run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from geomap.capture.config import CaptureConfig
from geomap.capture.engine import iter_capture
from geomap.ingest.runs import RunSummary, ensure_vocab, model_identity, start_run
from geomap.models.loading import LoadedModel
from geomap.store.db import connect, defer_checkpoints, ensure_schema
from geomap.store.writer import PromptSpec, prompt_key, vocab_texts, write_batch


def pending_prompts(con, identity: str, config_json: str, prompts: Sequence[PromptSpec]
                    ) -> tuple[list[tuple[PromptSpec, str]], list[tuple[PromptSpec, str]]]:
    """Key every prompt; returns ``(keyed, todo)``: all of them, and those not stored yet (first of each key)."""
    keyed = [(spec, prompt_key(identity, config_json, spec.text)) for spec in prompts]
    seen = {row[0] for row in con.execute("SELECT key FROM prompts").fetchall()}
    todo = []
    for spec, key in keyed:
        if key not in seen:
            todo.append((spec, key))
            seen.add(key)
    return keyed, todo


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
        keyed, todo = pending_prompts(con, identity, config_json, prompts)
        run_id = start_run(con, loaded, config, vector_dtype, pipeline, run_id)
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


def store_text(db_path: str | Path, text: str, loaded: LoadedModel | None = None) -> int:
    """Store ``text`` with attention and lens at every position (unless stored already); return its prompt id.

    This is how a report of an ad-hoc text gets its data: the ingestion stage captures, the report reads.
    """
    from geomap.models import load_model

    loaded = loaded or load_model()
    config = CaptureConfig(attn_positions="all", lens_positions="all")
    ingest(loaded, [PromptSpec(text)], db_path, config, progress=False)
    key = prompt_key(model_identity(loaded), config.to_json(), text)
    con = connect(db_path, read_only=True)
    try:
        return int(con.execute("SELECT id FROM prompts WHERE key = ?", [key]).fetchall()[0][0])
    finally:
        con.close()

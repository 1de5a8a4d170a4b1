"""Ingestion: capture prompts batch by batch and store each batch in one transaction, resumably.

A prompt whose key is already stored is skipped, so rerunning is idempotent and a killed run resumes where
it stopped: an interrupted batch's transaction never committed, the interrupted run row is taken up again, and
derived FAISS indexes catch up from DuckDB at the end of every run (finishing any interrupted index build).
Commit boundaries carry `geomap.faults.kill_point` calls for the fault-injection tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from geomap.capture.config import CaptureConfig
from geomap.capture.engine import iter_capture
from geomap.faults import kill_point
from geomap.ingest.runs import RunSummary, ensure_vocab, mark_failed, model_identity, resumable_run, start_run
from geomap.ingest.validate import check_against_model
from geomap.models.loading import LoadedModel
from geomap.store.db import connect, defer_checkpoints, ensure_schema, storage_error
from geomap.store.writer import PromptSpec, prompt_key, vocab_texts, write_batch


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
        A summary of the run; its ``run_id`` is None when nothing was left to store (no run is recorded then).
        A rerun after a kill or a failure finishes the interrupted run (same pipeline, model and options) under
        its own id instead of starting another.

    Raises:
        GeomapError: Layers or positions the model or a prompt does not have (before any run is recorded); a
            disk that refused a write (`StorageError`, the run is marked ``failed``).
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
        check_against_model(loaded, config, [spec.text for spec, _ in todo])
        if run_id is None:
            run_id = resumable_run(con, loaded, config, vector_dtype, pipeline)
            if run_id is None and not todo:  # nothing to store and nothing to finish: record no empty run
                if index:
                    _sync(con, db_path)
                return RunSummary(None, 0, len(keyed), 0, 0, time.perf_counter() - start, ())
        run_id = start_run(con, loaded, config, vector_dtype, pipeline, run_id)
        kill_point("run.started")
        try:
            done, failed, n_tokens, failures = _store(con, loaded, todo, run_id, config, vector_dtype, batch_size,
                                                      texts, progress, on_progress, len(keyed), start)
            if index:
                _sync(con, db_path)
            kill_point("run.indexed")
            con.execute("UPDATE runs SET status = 'done', finished_at = now() WHERE id = ?", [run_id])
        except Exception as exc:
            mark_failed(con, db_path, run_id)
            if (error := storage_error(exc, db_path)) is not None:
                raise error from None
            raise
        return RunSummary(run_id, done, len(keyed) - len(todo), failed, n_tokens, time.perf_counter() - start,
                          tuple(failures))
    finally:
        con.close()


def _sync(con, db_path: Path) -> None:
    from geomap.store.vectors import sync_state_indexes

    sync_state_indexes(con, db_path)


def _store(con, loaded: LoadedModel, todo: list, run_id: int, config: CaptureConfig, vector_dtype: str,
           batch_size: int, texts, progress: bool, on_progress: Callable[[dict], None] | None, n_keyed: int,
           start: float) -> tuple[int, int, int, list[str]]:
    """Capture ``todo`` and write it batch by batch; returns ``(stored, failed, tokens, failures)``."""
    done = failed = n_tokens = 0
    failures = []

    def report() -> None:
        if on_progress is not None:
            on_progress({"run_id": run_id, "total": len(todo), "stored": done, "skipped": n_keyed - len(todo),
                         "failed": failed, "tokens": n_tokens})

    report()
    bar = tqdm(total=len(todo), unit="prompt", disable=not progress or not todo, desc=f"run {run_id}",
               dynamic_ncols=True)
    pending = []
    try:  # the bar ends its line even when a batch fails, so an error message starts a line of its own
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
    finally:
        bar.close()
    return done, failed, n_tokens, failures


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

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
from geomap.ingest.merger import Merged, ShardMerger
from geomap.ingest.runs import RunSummary, ensure_vocab, mark_failed, model_identity, resumable_run, start_run
from geomap.ingest.validate import check_against_model
from geomap.models.loading import LoadedModel
from geomap.store.db import ensure_schema, storage_error
from geomap.store.handle import Store, StoreLike
from geomap.store.segments import open_for_writing
from geomap.store.writer import PromptSpec, prompt_key, vocab_texts


def ingest(loaded: LoadedModel, prompts: Sequence[PromptSpec], store: StoreLike,
           config: CaptureConfig | None = None, vector_dtype: str = "float32", batch_size: int = 8,
           pipeline: str = "ingest", progress: bool = True, index: bool = True, run_id: int | None = None,
           on_progress: Callable[[dict], None] | None = None) -> RunSummary:
    """Capture and store prompts; already stored prompts (same key) are skipped.

    Args:
        loaded: The model.
        prompts: Prompts with their provenance.
        store: The store (a path opens one for the call, creating it if missing).
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
    with Store.use(store, "w") as opened, opened.writer() as con:
        texts = prepare_store(opened, con, loaded)
        identity, config_json = model_identity(loaded), config.to_json()
        keyed = [(spec, prompt_key(identity, config_json, spec.text)) for spec in prompts]
        todo = unstored(con, keyed)
        check_against_model(loaded, config, [spec.text for spec, _ in todo])
        if run_id is None:
            run_id = resumable_run(con, loaded, config, vector_dtype, pipeline)
            if run_id is None and not todo:  # nothing to store and nothing to finish: record no empty run
                if index:
                    _sync(con, opened.path)
                return RunSummary(None, 0, len(keyed), 0, 0, time.perf_counter() - start, ())
        run_id = start_run(con, loaded, config, vector_dtype, pipeline, run_id)
        kill_point("run.started")
        tally = _Tally(run_id, len(todo), len(keyed) - len(todo), on_progress, start)
        tally.report()
        try:
            _store(con, loaded, todo, run_id, config, vector_dtype, batch_size, texts, identity, config_json,
                   tally, progress)
            if index:
                _sync(con, opened.path)
            kill_point("run.indexed")
            con.execute("UPDATE runs SET status = 'done', finished_at = now() WHERE id = ?", [run_id])
        except Exception as exc:
            mark_failed(opened, con, run_id)
            if (error := storage_error(exc, opened.path)) is not None:
                raise error from None
            raise
        return RunSummary(run_id, tally.done, len(keyed) - len(todo), tally.failed, tally.tokens,
                          time.perf_counter() - start, tuple(tally.failures))


def _sync(con, db_path: Path) -> None:
    from geomap.store.vectors import sync_state_indexes

    sync_state_indexes(con, db_path)


def _store(con, loaded: LoadedModel, todo: list, run_id: int, config: CaptureConfig, vector_dtype: str,
           batch_size: int, texts, identity: str, config_json: str, tally: _Tally, progress: bool) -> None:
    """Capture ``todo`` and hand it to the one merger batch by batch; ``tally`` counts what was merged."""
    bar = tqdm(total=len(todo), unit="prompt", disable=not progress or not todo, desc=f"run {run_id}",
               dynamic_ncols=True)
    tally.bar = bar
    meta = {"model": identity, "capture": config_json}
    try:  # the bar ends its line even when a batch fails, so an error message starts a line of its own
        with ShardMerger(con, run_id, vector_dtype, texts, meta, tally.merged) as merger:
            pending = []
            for index_, result in iter_capture(loaded, [spec.text for spec, _ in todo], config, batch_size):
                pending.append((index_, *todo[index_], result))
                if len(pending) >= batch_size or tally.queued + len(pending) == len(todo):
                    pending.sort(key=lambda item: item[0])  # prompt ids follow input order
                    tally.queued += len(pending)
                    merger.put([item[1:] for item in pending])
                    pending = []
    finally:
        bar.close()


def prepare_store(store: Store, con, loaded: LoadedModel):
    """Ready a store for a run of ``loaded``; returns its token texts by id.

    Sets the writer up, the schema and the vocabulary, and writes the weight slice its reports read.
    """
    from geomap.analysis.weights import slice_folder
    from geomap.models.weights_slice import write_slice

    store.prepare_writer()
    ensure_schema(con, loaded.anatomy.d_model)
    open_for_writing(con)
    ensure_vocab(con, loaded)
    if next(loaded.model.parameters()).device.type != "meta":  # a skeleton (Ray's driver) has no weights to copy
        write_slice(loaded, slice_folder(store.path, loaded.weights_hash))
    return vocab_texts(con, loaded.weights_hash, loaded.anatomy.vocab_size)


def unstored(con, keyed: Sequence[tuple[PromptSpec, str]]) -> list[tuple[PromptSpec, str]]:
    """The ``(spec, key)`` pairs whose key is not stored yet, first occurrence of each key, in input order."""
    seen = {row[0] for row in con.execute("SELECT key FROM prompts WHERE key IN (SELECT unnest(?))",
                                          [[key for _, key in keyed]]).fetchall()}
    todo = []
    for spec, key in keyed:
        if key not in seen:
            todo.append((spec, key))
            seen.add(key)
    return todo


class _Tally:
    """Counts of a run as its batches are merged (updated by the merging thread), shown and reported."""

    def __init__(self, run_id: int, total: int, skipped: int, on_progress, start: float):
        self.run_id, self.total, self.skipped, self.on_progress, self.start = run_id, total, skipped, on_progress, start
        self.done = self.failed = self.tokens = self.queued = 0
        self.failures: list[str] = []
        self.bar = None

    def report(self) -> None:
        if self.on_progress is not None:
            self.on_progress({"run_id": self.run_id, "total": self.total, "stored": self.done,
                              "skipped": self.skipped, "failed": self.failed, "tokens": self.tokens})

    def merged(self, merged: Merged) -> None:
        errors = merged.counts["errors"]
        for spec, _, result in merged.items:
            if spec.text in errors:
                self.failed += 1
                self.failures.append(f"{spec.text[:40]!r}: {errors[spec.text]}")
            else:
                self.done += 1
                self.tokens += len(result.tokens)
        self.report()
        if self.bar is not None:
            self.bar.update(len(merged.items))
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix(tok_s=f"{self.tokens / elapsed:.0f}", rows=merged.counts.get("states", 0))


def store_text(store: StoreLike, text: str, loaded: LoadedModel | None = None) -> int:
    """Store ``text`` with attention and lens at every position (unless stored already); return its prompt id.

    This is how a report of an ad-hoc text gets its data: the ingestion stage captures, the report reads.
    """
    from geomap.models import load_model

    loaded = loaded or load_model()
    config = CaptureConfig(attn_positions="all", lens_positions="all")
    with Store.use(store, "w") as opened:
        ingest(loaded, [PromptSpec(text)], opened, config, progress=False)
        key = prompt_key(model_identity(loaded), config.to_json(), text)
        return int(opened.query("SELECT id FROM prompts WHERE key = ?", [key]).scalar())

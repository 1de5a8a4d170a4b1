"""Ingestion: capture prompts batch by batch and store each batch in one transaction, resumably.

A prompt whose key is already stored is skipped, so rerunning is idempotent and a killed run resumes where
it stopped: an interrupted batch's transaction never committed, the interrupted run row is taken up again, and
derived FAISS indexes catch up from DuckDB at the end of every run (finishing any interrupted index build).
The run's bookkeeping (run row, counts, index sync, failure) is the one lifecycle of `geomap.ingest.runs.Run`;
this module only captures batches and hands them to the run's merger.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tqdm import tqdm

from geomap.capture.config import CaptureConfig
from geomap.capture.engine import iter_capture
from geomap.ingest.runs import Run, RunOptions, RunSummary, model_identity
from geomap.models.loading import LoadedModel
from geomap.store.handle import Store, StoreLike
from geomap.store.writer import PromptSpec, prompt_key


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
    options = RunOptions(config or CaptureConfig(), vector_dtype, batch_size, pipeline, progress, index, run_id,
                         on_progress)
    with Store.use(store, "w") as opened, opened.writer() as con:
        run = Run(opened, con, loaded, options)
        todo = run.plan(prompts)
        if run.start(needed=bool(todo)) is None:  # nothing to store and nothing to finish: record no empty run
            return run.complete()
        try:
            _capture(loaded, todo, run)
            return run.complete()
        except Exception as exc:
            run.failed(exc)
            raise


def _capture(loaded: LoadedModel, todo: list[tuple[PromptSpec, str]], run: Run) -> None:
    """Capture ``todo`` and hand it to the run's one merger batch by batch (prompt ids follow input order)."""
    batch_size, queued = run.options.batch_size, 0
    bar = tqdm(total=len(todo), unit="prompt", disable=not run.options.progress or not todo, desc=f"run {run.run_id}",
               dynamic_ncols=True)
    run.tally.bar = bar
    try:  # the bar ends its line even when a batch fails, so an error message starts a line of its own
        with run.merger() as merger:
            pending = []
            for index_, result in iter_capture(loaded, [spec.text for spec, _ in todo], run.options.config,
                                               batch_size):
                pending.append((index_, *todo[index_], result))
                if len(pending) >= batch_size or queued + len(pending) == len(todo):
                    pending.sort(key=lambda item: item[0])
                    queued += len(pending)
                    merger.put([item[1:] for item in pending])
                    pending = []
    finally:
        bar.close()


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

"""Runs: the one run lifecycle every producer of shards stores through, and the run rows it writes.

`Run` is the lifecycle, in the spirit of Ray Data's ``Datasink`` (start, a batch merged, complete, failed). The inline
engine (`geomap.ingest.engine`), the Ray driver (`geomap.ingest.ray_engine`) and generation
(`geomap.ingest.generation`) only produce batches or shards and hand them to it::

    run = Run(store, con, model, options)   # the store made ready for this model: writer settings, schema, vocabulary
    todo = run.plan(prompts)                # the prompts not stored yet, checked against the model (no run row yet)
    try:
        run.start()                         # the run row: a queued row filled, an interrupted run taken up, or new
        with run.merger() as merger:        # the one writer thread; each merge is counted by `Run.batch_merged`
            merger.put(batch)               # captured items, or a ready `Shard`
        return run.complete()               # FAISS indexes synced, status done, the `RunSummary`
    except Exception as exc:
        run.failed(exc)                     # status failed; a disk's refusal becomes a one-line `StorageError`
        raise

A fourth producer does the same with its own batches. The rest of the module is the run rows themselves, the model's
identity, and the model-level metadata (vocabulary, norm names) a run writes first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa

from geomap.capture.config import CaptureConfig
from geomap.capture.tokens import describe_tokens
from geomap.errors import GeomapError
from geomap.faults import kill_point
from geomap.ingest.merger import Merged, ShardMerger
from geomap.ingest.summary import RunSummary
from geomap.ingest.validate import check_against_model
from geomap.models.loading import LoadedModel
from geomap.store.db import ensure_schema, rollback_quietly, storage_error
from geomap.store.handle import Store
from geomap.store.segments import open_for_writing
from geomap.store.vectors import sync_state_indexes
from geomap.store.writer import PromptSpec, prompt_key, vocab_texts


@dataclass(frozen=True)
class RunOptions:
    """How a run stores its prompts; every producer takes the same options.

    Attributes:
        config: Capture options.
        vector_dtype: ``"float32"`` or ``"bfloat16"``.
        batch_size: Prompts per forward pass and per merge.
        pipeline: Name recorded on the run.
        progress: Show a progress bar on stderr.
        index: Bring the FAISS indexes up to date when the run completes.
        run_id: A ``queued`` run row (from `reserve_run`) to fill in, instead of a new run.
        on_progress: Called after every merge (and once at the start) with ``run_id, total, stored, skipped,
            failed, tokens`` (and ``workers`` on Ray).
    """

    config: CaptureConfig = field(default_factory=CaptureConfig)
    vector_dtype: str = "float32"
    batch_size: int = 8
    pipeline: str = "ingest"
    progress: bool = True
    index: bool = True
    run_id: int | None = None
    on_progress: Callable[[dict], None] | None = None


class Tally:
    """A run's counts as its batches are merged (updated by the merging thread), shown and reported.

    Attributes:
        total: Prompts this run stores (not stored before it).
        skipped: Prompts stored before it.
        done, failed, tokens: Prompts merged as journeys, as errors, and the journeys' tokens.
        failures: One line per failed prompt.
        workers: Ray capture actors alive (None when unknown), shown and reported when ``show_workers`` is set.
        bar: The progress bar, if one is shown.
    """

    def __init__(self, run_id: int | None, on_progress: Callable[[dict], None] | None, started: float):
        self.run_id, self.on_progress, self.started = run_id, on_progress, started
        self.total = self.skipped = self.done = self.failed = self.tokens = 0
        self.failures: list[str] = []
        self.workers: int | None = None
        self.show_workers = False
        self.bar = None

    def report(self) -> None:
        """Tell ``on_progress`` the counts."""
        if self.on_progress is not None:
            counts = {"run_id": self.run_id, "total": self.total, "stored": self.done, "skipped": self.skipped,
                      "failed": self.failed, "tokens": self.tokens}
            self.on_progress({**counts, "workers": self.workers} if self.show_workers else counts)

    def merged(self, merged: Merged) -> None:
        """Count one merge (called in the merging thread)."""
        errors = merged.counts["errors"]
        self.failed += len(errors)
        self.failures += [f"{text[:40]!r}: {reason}" for text, reason in errors.items()]
        self.done += merged.counts["prompts"] - len(errors)
        self.tokens += merged.counts.get("tokens", 0)
        self.report()
        if self.bar is not None:
            self.bar.update(merged.counts["prompts"] + merged.counts["skipped"])
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            rate = self.tokens / elapsed
            shown = {"tok_s": f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"}  # 0.31, not a misleading 0
            if self.show_workers:
                shown["workers"] = "?" if self.workers is None else str(self.workers)
            self.bar.set_postfix(**shown)

    def summary(self, seconds: float) -> RunSummary:
        """The run's summary."""
        return RunSummary(self.run_id, self.done, self.skipped, self.failed, self.tokens, seconds,
                          tuple(self.failures))


class Run:
    """One run's lifecycle: start, a batch merged (any number), then complete or failed (see the module's example).

    Args:
        store: The store, open for writing.
        con: Its writing cursor (auto-commit: each merge is its own transaction), used by this run only.
        model: The model, or a skeleton of it (a Ray driver's: config, tokenizer and weights hash).
        options: How the run stores its prompts.

    Attributes:
        run_id: The run's id once started (None before, or when nothing needed a run).
        texts: Token texts by id (``lens_stats.top1_token``).
        meta: Facts every shard of this run records (model identity, capture config).
        tally: The run's counts.
    """

    def __init__(self, store: Store, con, model: LoadedModel, options: RunOptions):
        self.store, self.con, self.model, self.options = store, con, model, options
        self.started = time.perf_counter()
        self.texts = prepare_store(store, con, model)
        self.identity, self.config_json = model_identity(model), options.config.to_json()
        self.meta = {"model": self.identity, "capture": self.config_json}
        self.run_id: int | None = None
        self.tally = Tally(None, options.on_progress, self.started)

    def key(self, spec: PromptSpec) -> str:
        """A prompt's key under this run's model and capture options."""
        return prompt_key(self.identity, self.config_json, spec.text)

    def plan(self, prompts: Sequence[PromptSpec]) -> list[tuple[PromptSpec, str]]:
        """The ``(spec, key)`` pairs not stored yet, checked against the model before any run row exists.

        Raises:
            GeomapError: Layers or positions the model or a prompt does not have.
        """
        keyed = [(spec, self.key(spec)) for spec in prompts]
        todo = unstored(self.con, keyed)
        check_against_model(self.model, self.options.config, [spec.text for spec, _ in todo])
        self.tally.total, self.tally.skipped = len(todo), len(keyed) - len(todo)
        return todo

    def start(self, needed: bool = True) -> int | None:
        """Start: fill the queued row, else take up an interrupted run of this same command, else insert one.

        Args:
            needed: Whether there is anything to store; if not, and no run is there to take up, no run is recorded
                (a reserved ``queued`` row is deleted) and None is returned.
        """
        o = self.options
        run_id = o.run_id
        if run_id is None:
            run_id = resumable_run(self.con, self.model, o.config, o.vector_dtype, o.pipeline)
            if run_id is None and not needed:
                return None
        elif (earlier := resumable_run(self.con, self.model, o.config, o.vector_dtype, o.pipeline, below=run_id)) \
                is not None and drop_queued(self.con, run_id):
            run_id = earlier  # a server's job reruns a killed run of this same command: it takes that run up
        elif not needed and drop_queued(self.con, run_id):
            return None  # a reserved row with nothing to fill it: no empty run is recorded, as without a server
        self.run_id = self.tally.run_id = start_run(self.con, self.model, o.config, o.vector_dtype, o.pipeline,
                                                    run_id)
        kill_point("run.started")
        self.tally.report()
        return self.run_id

    def merger(self, on_merged: Callable[[Merged], None] | None = None, depth: int = 2) -> ShardMerger:
        """The run's one writer thread (a context manager): batches and shards put into it are merged in order.

        Args:
            on_merged: Called after each merge instead of `batch_merged` (a producer's hook that calls it).
            depth: Batches that may wait for the thread.
        """
        return ShardMerger(self.con, self.run_id, self.options.vector_dtype, self.texts, self.meta,
                           on_merged or self.batch_merged, depth)

    def batch_merged(self, merged: Merged) -> None:
        """A batch or shard was merged (in the merging thread): count it."""
        self.tally.merged(merged)

    def complete(self) -> RunSummary:
        """Sync the FAISS indexes (unless the options say not to) and mark the run ``done``; its summary."""
        if self.options.index:
            sync_state_indexes(self.con, self.store.path)
        if self.run_id is not None:
            kill_point("run.indexed")
            self.con.execute("UPDATE runs SET status = 'done', finished_at = now() WHERE id = ?", [self.run_id])
        return self.tally.summary(time.perf_counter() - self.started)

    def failed(self, exc: BaseException) -> None:
        """After an error: mark the run ``failed``, and raise a disk's refusal as a one-line `StorageError`.

        Any other error returns, for the caller to re-raise as it is.
        """
        if self.run_id is not None:
            mark_failed(self.store, self.run_id, self.con)
        if (error := storage_error(exc, self.store.path)) is not None:
            raise error from None


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


def model_identity(loaded: LoadedModel) -> str:
    """The model part of a prompt key: architecture and weights hash (not the path it was loaded from)."""
    return f"{loaded.anatomy.model_type}:{loaded.weights_hash}"


def ensure_vocab(con, loaded: LoadedModel) -> None:
    """Store the model's vocabulary (id, display text, raw bytes) and norm names, in one transaction.

    What is stored is checked for completeness, not presence: a store whose vocabulary or norm names are
    incomplete (written by an older geomap that was killed between the two inserts) is repaired here.
    """
    sha, a = loaded.weights_hash, loaded.anatomy
    n_vocab = int(min(a.vocab_size, len(loaded.tokenizer)))
    names = [*a.spec.layer_norms, "final_norm"]
    have_vocab = con.execute("SELECT count(*) FROM vocab WHERE weights_sha256 = ?", [sha]).fetchall()[0][0]
    have_names = con.execute("SELECT count(*) FROM norm_names WHERE model_type = ?", [a.model_type]).fetchall()[0][0]
    if have_vocab == n_vocab and have_names == len(names):
        return
    con.execute("BEGIN TRANSACTION")
    try:
        if have_vocab != n_vocab:
            con.execute("DELETE FROM vocab WHERE weights_sha256 = ?", [sha])
            tokens = describe_tokens(loaded.tokenizer, np.arange(n_vocab, dtype=np.int64))
            table = pa.table({"weights_sha256": pa.array([sha] * n_vocab),
                              "token_id": pa.array(tokens.ids.astype(np.int32)), "text": pa.array(list(tokens.texts)),
                              "raw": pa.array(list(tokens.raw), pa.binary()), "special": pa.array(tokens.special)})
            con.register("_geomap_vocab", table)
            con.execute("INSERT INTO vocab SELECT * FROM _geomap_vocab")
            con.unregister("_geomap_vocab")
        kill_point("vocab.inserted")
        con.execute("DELETE FROM norm_names WHERE model_type = ?", [a.model_type])
        con.executemany("INSERT INTO norm_names VALUES (?, ?, ?)", [(a.model_type, i, name) for i, name in
                                                                    enumerate(names)])
        con.execute("COMMIT")
    except BaseException:
        rollback_quietly(con)
        raise


def reserve_run(con, pipeline: str, above: int = 0) -> int:
    """Insert a ``queued`` run row (filled in when its ingestion starts) and return its id.

    One statement picks the id and inserts the row; `start_run` fills a queued row in place, so no other writer
    ever sees the largest id disappear and hands it out twice. A queued row that turns out not to be needed is
    deleted (`Run.start`); ``above`` (the largest id the caller reserved before) keeps its id from being handed out
    again to the same caller, whose clients may still ask about it.
    """
    return int(con.execute("INSERT INTO runs (id, started_at, status, pipeline) SELECT greatest(coalesce(max(id), 0), "
                           "?) + 1, now(), 'queued', ? FROM runs RETURNING id", [above, pipeline]).fetchall()[0][0])


def drop_queued(con, run_id: int) -> bool:
    """Delete run ``run_id`` if it is still a ``queued`` reservation (`reserve_run`) that no ingestion started."""
    return bool(con.execute("DELETE FROM runs WHERE id = ? AND status = 'queued' RETURNING id", [run_id]).fetchall())


def resumable_run(con, loaded: LoadedModel, config: CaptureConfig, vector_dtype: str, pipeline: str,
                  below: int | None = None) -> int | None:
    """The store's last run if a kill or a failure stopped it and it ran this same command; else None.

    Same command: same pipeline name, weights, capture options and vector dtype. A rerun finishes such a run under
    its own id, so a killed run plus one rerun leaves the store as one uninterrupted run would. ``below`` (a server
    job's reserved run) looks at the last run before that one.
    """
    rows = con.execute("SELECT id, status, weights_sha256, capture_config::VARCHAR, vector_dtype, pipeline FROM runs "
                       "WHERE id < ? ORDER BY id DESC LIMIT 1", [2**63 - 1 if below is None else below]).fetchall()
    if not rows:
        return None
    run_id, status, sha, config_json, dtype, name = rows[0]
    same = (sha, config_json, dtype, name) == (loaded.weights_hash, config.to_json(), vector_dtype, pipeline)
    return int(run_id) if same and status in ("running", "interrupted", "failed") else None


def start_run(con, loaded: LoadedModel, config: CaptureConfig, vector_dtype: str, pipeline: str,
              run_id: int | None = None) -> int:
    """Mark runs left ``running`` as interrupted and insert a ``running`` run row.

    ``run_id`` names a ``queued`` row to fill in (from `reserve_run`), or an interrupted run to take up again
    (from `resumable_run`).
    """
    if run_id is not None:
        resumed = con.execute("UPDATE runs SET status = 'running', finished_at = NULL WHERE id = ? AND status IN "
                              "('running', 'interrupted', 'failed') RETURNING id", [run_id]).fetchall()
        if resumed:
            con.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running' AND id <> ?", [run_id])
            return run_id
    con.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")  # we hold the write lock
    a = loaded.anatomy
    values = [loaded.name, a.model_type, loaded.weights_hash, str(loaded.dtype).removeprefix("torch."), vector_dtype,
              config.to_json(), pipeline, a.n_layers, a.d_model, a.n_heads, a.n_kv_heads, a.head_dim, a.vocab_size]
    if run_id is not None:  # a queued row, filled in place (its id is never free in between)
        filled = con.execute(
            "UPDATE runs SET started_at = now(), finished_at = NULL, model = ?, model_type = ?, weights_sha256 = ?, "
            "dtype = ?, vector_dtype = ?, capture_config = ?, pipeline = ?, status = 'running', n_layers = ?, "
            "d_model = ?, n_heads = ?, n_kv_heads = ?, head_dim = ?, vocab_size = ? WHERE id = ? AND status = "
            "'queued' RETURNING id", [*values, run_id]).fetchall()
        if filled:
            return run_id
    return int(con.execute(  # the given id, else the next one, picked in the statement that inserts the row
        "INSERT INTO runs SELECT coalesce(?::INTEGER, coalesce(max(id), 0) + 1), now(), NULL, ?, ?, ?, ?, ?, ?, ?, "
        "'running', ?, ?, ?, ?, ?, ? FROM runs RETURNING id", [run_id, *values]).fetchall()[0][0])


def mark_failed(store: Store, run_id: int, con=None) -> None:
    """Mark a run ``failed`` after an error, best effort, never raising over the error that led here.

    ``con`` (the run's own cursor) is tried first; DuckDB may have invalidated it after the error, so a fresh cursor
    of the store tries again. On a full disk both may fail: the next run then finds the run ``running`` and takes
    it up again. A server marks a failed job's run through here too.
    """
    def mark(c) -> None:
        rollback_quietly(c)
        c.execute("UPDATE runs SET status = 'failed', finished_at = now() WHERE id = ?", [run_id])

    if con is not None:
        try:
            mark(con)
            return
        except (duckdb.Error, OSError):
            pass
    try:
        with store.writer() as fresh:
            mark(fresh)
    except (duckdb.Error, OSError, GeomapError):
        pass

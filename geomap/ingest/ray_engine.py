"""Ingestion on Ray: the prompts as a Ray Dataset, a pool of model actors, and this process as the one writer.

The driver (this process) keys the prompts, skips those already stored, and streams the rest through Ray Data's
``map_batches`` onto a fixed pool of `CaptureWorker` actors (one per GPU, or CPU actors with a thread budget),
each loading the model once. Each batch becomes a shard (`geomap.store.shards`) that its worker writes to the
run's shard folder; the driver merges each one as it arrives, in prompt order, through the same `ShardMerger` as
the inline engine, and removes it once merged. FAISS indexes catch up after the last merge, as inline.

Fault tolerance is Ray's: a worker whose process dies is restarted (``max_restarts``) and the batches it held are
retried (``max_task_retries``). A driver that dies loses nothing written: the same command first merges the shards
its workers left in the folder, then skips every stored key and captures the rest. A shard is merged once
(``merged_shards``), and a prompt whose key is stored is never stored again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from geomap.capture.config import CaptureConfig
from geomap.errors import GeomapError
from geomap.ingest.engine import prepare_store, unstored
from geomap.ingest.engine_config import EngineConfig
from geomap.ingest.merger import Merged, ShardMerger
from geomap.ingest.ray_worker import CaptureWorker, prompt_table
from geomap.ingest.runs import RunSummary, model_identity, start_run
from geomap.store.handle import Store, StoreLike
from geomap.store.shards import ShardError, read_shard, shard_paths
from geomap.store.writer import PromptSpec, prompt_key

INSTALL_HINT = "pip install 'geomap[ray]'"


class RayMissingError(GeomapError):
    """The Ray engine was asked for, but Ray is not installed."""


def require_ray():
    """Import Ray (and Ray Data), or raise `RayMissingError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayMissingError(f"the Ray engine needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class WorkerPlan:
    """How many model replicas run, and what each one holds."""

    workers: int
    device: str
    num_cpus: float
    num_gpus: float
    threads: int | None


def plan_workers(engine: EngineConfig, resources: dict, device: str | None = None) -> WorkerPlan:
    """Size the actor pool from the cluster's resources: one actor per GPU, else CPU actors sharing the cores.

    Raises:
        GeomapError: More GPU workers than the cluster has GPUs, or a CUDA device on a cluster without GPUs.
    """
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    device = device or ("cuda" if gpus else "cpu")
    if device.startswith("cuda"):
        workers = engine.workers or gpus
        if workers > gpus:
            raise GeomapError(f"{workers} GPU workers asked for, but the Ray cluster has {gpus} GPUs; use --workers "
                              f"{gpus} or --device cpu" if gpus else "no GPU in the Ray cluster; use --device cpu")
        return WorkerPlan(workers, device, 1.0, 1.0, engine.threads)
    workers = engine.workers or max(1, cpus // 2)
    threads = engine.threads or max(1, cpus // workers)
    return WorkerPlan(workers, device, min(float(threads), cpus / workers), 0.0, threads)


def _start_ray(ray, engine: EngineConfig) -> bool:
    """Join ``engine.address``, or start Ray locally with this machine's cores; returns whether we started it."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if engine.address:
            ray.init(address=engine.address, **kwargs)
        else:
            ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)  # never a cluster it happens to find
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = engine.address or "this machine"
        raise GeomapError(f"cannot start or join Ray at {where}: {str(exc).splitlines()[0]}") from None
    return True


def _quiet_data(ray) -> None:
    """Ray Data without its own progress bars, in input order (so prompt ids follow the input, as inline)."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _workers_alive(ray) -> int | None:
    """Capture actors of this job that are alive now (None when Ray cannot say)."""
    try:
        from ray._private.state import actors

        job = ray.get_runtime_context().get_job_id()
        return sum(1 for a in actors().values() if a.get("State") == "ALIVE" and a.get("JobID") == job
                   and "CaptureWorker" in str(a.get("ActorClassName", "")) + str(a.get("Name", "")))
    except Exception:  # noqa: BLE001 (a progress figure, never a reason to fail a run)
        return None


def shard_folder(db_path: Path, engine: EngineConfig) -> Path:
    """Where workers put shards: ``engine.shards``, else ``<store>.shards`` beside the DuckDB file (absolute)."""
    db_path = Path(db_path)
    return Path(engine.shards or db_path.with_name(db_path.stem + ".shards")).expanduser().resolve()


def ingest_ray(model: str, prompts: Sequence[PromptSpec], store: StoreLike, config: CaptureConfig | None = None,
               vector_dtype: str = "float32", batch_size: int = 8, pipeline: str = "ingest",
               engine: EngineConfig | None = None, device: str | None = None, dtype: str | None = None,
               progress: bool = True, index: bool = True,
               on_progress: Callable[[dict], None] | None = None, run_id: int | None = None) -> RunSummary:
    """Capture and store prompts with Ray workers; the same store as `geomap.ingest.engine.ingest` makes.

    Args:
        model: Preset, local model directory or hub id (every worker loads it; this process reads only its
            config, tokenizer and weights hash).
        prompts: Prompts with their provenance.
        store: The store (a path opens one for the call, creating it if missing); this process is its only writer.
        config: Capture options.
        vector_dtype: ``"float32"`` or ``"bfloat16"``.
        batch_size: Prompts per forward pass, per Ray task and per merge.
        pipeline: Name recorded on the run.
        engine: Ray address, worker count, threads and retry budget.
        device: The workers' device (default CUDA when the cluster has GPUs, else CPU).
        dtype: The workers' weights dtype.
        progress: Show a progress bar (prompts done, tokens/s, workers alive) on stderr.
        index: Bring the FAISS indexes up to date at the end.
        on_progress: Called after every merged shard (and once at the start) with ``run_id, total, stored,
            skipped, failed, tokens, workers``.
        run_id: A ``queued`` run row to fill in (a server's job), else a new run.

    Returns:
        A summary of the run.

    Raises:
        RayMissingError: Ray is not installed.
    """
    from geomap.models.skeleton import skeleton_model

    ray = require_ray()
    config, engine = config or CaptureConfig(), engine or EngineConfig(kind="ray")
    start = time.perf_counter()
    started = _start_ray(ray, engine)
    try:
        plan = plan_workers(engine, ray.cluster_resources(), device)
        skeleton = skeleton_model(model, plan.device, dtype)
        with Store.use(store, "w") as opened, opened.writer() as con:
            shards = shard_folder(opened.path, engine)
            texts = prepare_store(opened, con, skeleton)
            identity, config_json = model_identity(skeleton), config.to_json()
            meta = {"model": identity, "capture": config_json}
            run_id = start_run(con, skeleton, config, vector_dtype, pipeline, run_id)
            keyed = [(spec, prompt_key(identity, config_json, spec.text)) for spec in prompts]
            skipped = len(keyed) - len(unstored(con, keyed))  # stored before this run
            tally = _Tally(con, run_id, on_progress, start)
            with ShardMerger(con, run_id, vector_dtype, texts, meta, tally.merged) as merger:
                tally.leftovers(merger, shards, {**meta, "vector_dtype": vector_dtype})
            todo = unstored(con, keyed)
            tally.start(len(todo), skipped)
            if todo:
                _quiet_data(ray)
                parts = _dataset(ray, todo, model, plan, engine, dtype, config, batch_size,
                                 {"vector_dtype": vector_dtype, "meta": meta, "shards": str(shards)})
                tally.bar = tqdm(total=len(todo), unit="prompt", disable=not progress, dynamic_ncols=True,
                                 desc=f"run {run_id} (ray)")
                try:
                    with ShardMerger(con, run_id, vector_dtype, texts, meta, tally.merged) as merger:
                        tally.consume(ray, parts, merger)
                finally:
                    tally.bar.close()
                sweep_unfinished(shards)  # a killed worker's half-written shard (its batch was retried)
            if index:
                from geomap.store.vectors import sync_state_indexes

                sync_state_indexes(con, opened.path)
            con.execute("UPDATE runs SET status = 'done', finished_at = now() WHERE id = ?", [run_id])
            return tally.summary(time.perf_counter() - start)
    finally:
        if started:
            ray.shutdown()


def _dataset(ray, todo, model: str, plan: WorkerPlan, engine: EngineConfig, dtype: str | None,
             config: CaptureConfig, batch_size: int, shard_args: dict):
    """The prompts as a Ray Dataset (one block per batch), mapped onto the actor pool; yields one row per shard."""
    table = prompt_table(todo)
    blocks = [table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)]
    with warnings.catch_warnings():  # Ray 2.60 has no named parameter yet for an actor's restart and retry budget
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.data.from_arrow(blocks).map_batches(
            CaptureWorker, batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=True,
            fn_constructor_kwargs={"model": model, "device": plan.device, "dtype": dtype, "threads": plan.threads,
                                   "config": config, "batch_size": batch_size, **shard_args},
            compute=ray.data.ActorPoolStrategy(size=plan.workers), num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus or None, max_restarts=engine.max_restarts,
            max_task_retries=engine.max_task_retries)


def sweep_unfinished(folder: Path) -> None:
    """Remove the temporary folders of shards whose worker died while writing them (never a finished shard).

    Called when no worker of this store's run is writing: before the workers start and after they are done.
    """
    for path in folder.glob(".*.tmp-*") if folder.is_dir() else ():
        shutil.rmtree(path, ignore_errors=True)


class _Tally:
    """The driver's side: hand shards to the merger as they arrive, count what was merged, show progress."""

    def __init__(self, con, run_id: int, on_progress: Callable[[dict], None] | None, started: float):
        self.con, self.run_id, self.on_progress = con, run_id, on_progress
        self.total = self.skipped = self.done = self.failed = self.tokens = 0
        self.failures: list[str] = []
        self.workers: int | None = None
        self.bar = None
        self.started = started  # the run's start, for tokens/s
        self._pending: dict[str, tuple[Path, dict]] = {}

    def start(self, total: int, skipped: int) -> None:
        self.total, self.skipped = total, skipped
        self._report()

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress({"run_id": self.run_id, "total": self.total, "stored": self.done,
                              "skipped": self.skipped, "failed": self.failed, "tokens": self.tokens,
                              "workers": self.workers})

    def put(self, merger: ShardMerger, folder: Path) -> int:
        """Queue the shard in ``folder`` for merging; returns its prompt count."""
        shard = read_shard(folder)
        prompts = shard.tables["prompts"]
        tokens = dict(zip(prompts.column("key").to_pylist(), prompts.column("n_tokens").to_pylist()))
        self._pending[shard.shard_id] = (folder, tokens)
        merger.put(shard)
        return len(tokens)

    def merged(self, merged: Merged) -> None:
        """After each merge (in the merging thread): count its new prompts, then remove the merged shard."""
        folder, tokens = self._pending.pop(merged.shard_id)
        errors = merged.counts["errors"]
        self.failed += len(errors)
        self.failures += [f"{text[:40]!r}: {reason}" for text, reason in errors.items()]
        self.done += merged.counts["prompts"] - len(errors)
        if merged.counts["prompts"]:
            if merged.counts["skipped"]:  # only these keys' rows are this shard's (the rest were stored before)
                stored = self.con.execute("SELECT key FROM prompts WHERE run_id = ? AND key IN (SELECT unnest(?))",
                                          [self.run_id, list(tokens)]).fetchall()
                tokens = {key: tokens[key] for (key,) in stored}
            self.tokens += sum(n or 0 for n in tokens.values())
        shutil.rmtree(folder, ignore_errors=True)
        self._report()
        if self.bar is not None:
            self.bar.update(merged.counts["prompts"])
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix(tok_s=f"{self.tokens / elapsed:.0f}",
                                 workers="?" if self.workers is None else self.workers)

    def leftovers(self, merger: ShardMerger, folder: Path, meta: dict) -> None:
        """Merge the shards a killed run's workers left (those of this model, capture config and dtype)."""
        sweep_unfinished(folder)
        for path in shard_paths(folder):
            try:
                if json.loads((path / "manifest.json").read_text()).get("meta") == meta:
                    self.put(merger, path)
            except (OSError, ValueError, ShardError) as exc:
                warnings.warn(f"left the unreadable shard {path} alone: {exc}", stacklevel=2)

    def consume(self, ray, parts, merger: ShardMerger) -> None:
        """Hand every shard of the dataset to the merger as it arrives."""
        checked = 0.0
        for row in parts.iter_rows():
            self.put(merger, Path(row["shard"]))
            if time.perf_counter() - checked > 1.0:
                self.workers, checked = _workers_alive(ray), time.perf_counter()

    def summary(self, seconds: float) -> RunSummary:
        return RunSummary(self.run_id, self.done, self.skipped, self.failed, self.tokens, seconds,
                          tuple(self.failures))

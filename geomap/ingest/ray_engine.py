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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from geomap.capture.config import CaptureConfig
from geomap.errors import GeomapError
from geomap.ingest.engine_config import EngineConfig
from geomap.ingest.merger import Merged, ShardMerger
from geomap.ingest.ray_worker import CaptureWorker, prompt_table
from geomap.ingest.runs import Run, RunOptions, RunSummary, unstored
from geomap.store.handle import Store, StoreLike
from geomap.store.shards import ShardError, filter_unmerged, read_shard, shard_paths
from geomap.store.writer import PromptSpec

INSTALL_HINT = "pip install 'geomap[ray]'"
ACTIVE_S = 30.0  # a worker that delivered no shard for this long no longer counts as working


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


def start_ray(ray, engine: EngineConfig) -> bool:
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


def quiet_data(ray) -> None:
    """Ray Data without its own progress bars, in input order (so prompt ids follow the input, as inline)."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def shard_folder(db_path: Path, engine: EngineConfig) -> Path:
    """Where workers put shards: ``engine.shards``, else ``<store>.shards`` beside the DuckDB file (absolute)."""
    db_path = Path(db_path)
    return Path(engine.shards or db_path.with_name(db_path.stem + ".shards")).expanduser().resolve()


def ingest_ray(model: str, prompts: Sequence[PromptSpec], store: StoreLike, options: RunOptions | None = None,
               engine: EngineConfig | None = None, device: str | None = None, dtype: str | None = None) -> RunSummary:
    """Capture and store prompts with Ray workers; the same store as `geomap.ingest.engine.ingest` makes.

    The run goes through the same lifecycle as an inline run (`geomap.ingest.runs.Run`): the prompts are checked
    against the model before a run row exists, an interrupted run of the same command is taken up, and an error
    marks the run ``failed`` (a disk's refusal as a one-line `StorageError`).

    Args:
        model: Preset, local model directory or hub id (every worker loads it; this process reads only its
            config, tokenizer and weights hash).
        prompts: Prompts with their provenance.
        store: The store (a path opens one for the call, creating it if missing); this process is its only writer.
        options: How the run stores its prompts (``batch_size`` is also the prompts per Ray task and per shard;
            ``on_progress`` also gets ``workers``).
        engine: Ray address, worker count, threads and retry budget.
        device: The workers' device (default CUDA when the cluster has GPUs, else CPU).
        dtype: The workers' weights dtype.

    Returns:
        A summary of the run; its ``run_id`` is None when every prompt was stored before (no run is recorded).

    Raises:
        RayMissingError: Ray is not installed.
    """
    from geomap.models.skeleton import skeleton_model

    ray = require_ray()
    options, engine = options or RunOptions(), engine or EngineConfig(kind="ray")
    started = start_ray(ray, engine)
    try:
        plan = plan_workers(engine, ray.cluster_resources(), device)
        skeleton = skeleton_model(model, plan.device, dtype)
        with Store.use(store, "w") as opened, opened.writer() as con:
            run = Run(opened, con, skeleton, options)
            if run.start(needed=bool(run.plan(prompts))) is None:  # all stored before: no empty run, as inline
                return run.complete()
            try:
                _drive(ray, run, prompts, model, plan, engine, dtype, shard_folder(opened.path, engine))
                return run.complete()
            except Exception as exc:
                run.failed(exc)
                raise
    finally:
        if started:
            ray.shutdown()


def _drive(ray, run: Run, prompts: Sequence[PromptSpec], model: str, plan: WorkerPlan, engine: EngineConfig,
           dtype: str | None, shards: Path) -> None:
    """Merge a killed run's leftover shards, then stream the prompts still unstored through the workers."""
    o = run.options
    driver = _Driver(run)
    run.tally.show_workers = True
    with run.merger(driver.merged) as merger:
        driver.leftovers(merger, shards, {**run.meta, "vector_dtype": o.vector_dtype})
    todo = unstored(run.con, [(spec, run.key(spec)) for spec in prompts])
    run.tally.total = len(todo)
    run.tally.report()
    if not todo:
        return
    quiet_data(ray)
    parts = _dataset(ray, todo, model, plan, engine, dtype, o.config, o.batch_size,
                     {"vector_dtype": o.vector_dtype, "meta": run.meta, "shards": str(shards)})
    run.tally.bar = tqdm(total=len(todo), unit="prompt", disable=not o.progress, dynamic_ncols=True,
                         desc=f"run {run.run_id} (ray)")
    try:
        with run.merger(driver.merged) as merger:
            driver.consume(parts, merger)
    finally:
        run.tally.bar.close()
    sweep_unfinished(shards)  # a killed worker's half-written shard (its batch was retried)


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


def remove_shard(path: Path) -> None:
    """Remove a merged shard's folder, renamed out of the way first.

    The rename is atomic, so a kill during the removal leaves a temporary folder that `sweep_unfinished` takes, never
    a shard folder holding part of its files.
    """
    gone = path.with_name(f".{path.name}.tmp-removed")
    shutil.rmtree(gone, ignore_errors=True)
    try:
        path.rename(gone)
    except FileNotFoundError:
        return
    shutil.rmtree(gone, ignore_errors=True)


class _Driver:
    """The driver's side of a Ray run: hand shards to the run's merger as they arrive, remove each once merged."""

    def __init__(self, run: Run):
        self.run = run
        self._pending: dict[str, Path] = {}

    def put(self, merger: ShardMerger, folder: Path) -> None:
        """Queue the shard in ``folder`` for merging."""
        shard = read_shard(folder)
        self._pending[shard.shard_id] = folder
        merger.put(shard)

    def merged(self, merged: Merged) -> None:
        """After each merge (in the merging thread): count it in the run, then remove the merged shard."""
        self.run.batch_merged(merged)
        remove_shard(self._pending.pop(merged.shard_id))

    def leftovers(self, merger: ShardMerger, folder: Path, meta: dict) -> None:
        """Merge the shards a killed run's workers left (those of this model, capture config and dtype)."""
        sweep_unfinished(folder)
        named = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")] if folder.is_dir() else []
        unmerged = set(filter_unmerged(self.run.con, [p.name for p in named]))
        for path in named:  # merged, then the driver was killed before (or while, in older versions) it removed it
            if path.name not in unmerged:
                remove_shard(path)
        for path in shard_paths(folder):
            try:
                if json.loads((path / "manifest.json").read_text()).get("meta") == meta:
                    self.put(merger, path)
            except (OSError, ValueError, ShardError) as exc:
                warnings.warn(f"left the unreadable shard {path} alone: {exc}", stacklevel=2)

    def consume(self, parts, merger: ShardMerger) -> None:
        """Hand every shard of the dataset to the merger as it arrives; count the workers delivering shards.

        A worker counts while it delivered a shard within the last `ACTIVE_S` seconds: a killed worker drops out, its
        restarted replica counts again once it delivers (Ray's public state API needs the dashboard, which a
        driver started here does not run).
        """
        seen: dict[str, float] = {}
        rows = iter(parts.iter_rows())
        try:
            for row in rows:
                self.put(merger, Path(row["shard"]))
                now = time.perf_counter()
                seen[row.get("worker") or "?"] = now
                self.run.tally.workers = sum(1 for t in seen.values() if now - t <= ACTIVE_S)
        finally:  # on an error too: Ray Data stops the run's actors now, not when the iterator is collected
            rows.close()

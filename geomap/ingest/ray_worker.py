"""The Ray engine's worker: one actor per model replica, turning batches of prompts into shards.

Ray Data calls `CaptureWorker` with a batch of prompt rows (``key, text, source, source_id, tags``); the actor
loaded the model once, captures the batch, writes it as a shard (`geomap.store.shards.write_shard`: atomic, named
by its content) into the run's shard folder and returns one row naming it. The driver merges it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

import pyarrow as pa

from geomap.capture.config import CaptureConfig
from geomap.capture.journey import Journey
from geomap.store.shards import build_shard, write_shard
from geomap.store.writer import PromptSpec


def prompt_table(todo: Sequence[tuple[PromptSpec, str]]) -> pa.Table:
    """The prompts still to capture as an Arrow table (one row per prompt, the columns `CaptureWorker` reads)."""
    return pa.table({"key": [key for _, key in todo], "text": [s.text for s, _ in todo],
                     "source": [s.source for s, _ in todo], "source_id": [s.source_id for s, _ in todo],
                     "tags": pa.array([list(s.tags) for s, _ in todo], pa.list_(pa.string()))})


def exit_with_parent(period: float = 1.0) -> None:
    """End this worker as soon as its parent (the node's raylet) is gone.

    When a driver that started Ray locally is killed, its raylet dies with it but Ray's workers only notice after a
    minute or more, holding the model's memory (a GPU's, on a cluster node) while the rerun starts new ones.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        os._exit(1)

    threading.Thread(target=watch, name="geomap-parent-watch", daemon=True).start()


def worker_model(model: str, device: str, dtype: str | None, threads: int | None):
    """A Ray actor's model: the actor ends with its parent, uses ``threads`` torch threads and prints no hub chatter."""
    import torch
    from transformers.utils import logging

    from geomap.models import load_model

    exit_with_parent()
    if threads:
        torch.set_num_threads(threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return load_model(model, device=device, dtype=dtype)


class CaptureWorker:
    """A Ray Data actor holding one model replica.

    Args:
        model: Preset, local directory or hub id.
        device: Torch device of this replica (``cuda`` when the actor holds a GPU).
        dtype: Weights dtype (None: the device's default).
        threads: Torch threads of a CPU replica (its share of the machine's cores).
        config: Capture options.
        batch_size: Prompts per forward pass.
        vector_dtype: Storage of state vectors in the shards.
        meta: Facts every shard records (model identity, capture config).
        shards: The folder shards are written to (shared by every node of a cluster).
    """

    def __init__(self, model: str, device: str, dtype: str | None, threads: int | None, config: CaptureConfig,
                 batch_size: int, vector_dtype: str, meta: dict, shards: str):
        self.loaded = worker_model(model, device, dtype, threads)
        self.config, self.batch_size, self.vector_dtype = config, batch_size, vector_dtype
        self.meta, self.shards = meta, shards

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Capture one batch of prompt rows into a shard; one row: ``shard``, ``prompts``, ``tokens``, ``worker``."""
        import ray

        from geomap.capture.engine import iter_capture

        rows = batch.to_pylist()
        specs = [PromptSpec(r["text"], r["source"], r["source_id"], tuple(r["tags"] or ())) for r in rows]
        results = dict(iter_capture(self.loaded, [s.text for s in specs], self.config, self.batch_size))
        items = [(spec, row["key"], results[i]) for i, (spec, row) in enumerate(zip(specs, rows))]
        path = write_shard(build_shard(items, self.vector_dtype, self.meta), self.shards)
        tokens = sum(len(r.tokens) for _, _, r in items if isinstance(r, Journey))
        worker = ray.get_runtime_context().get_actor_id() or ""
        return pa.table({"shard": [str(path)], "prompts": [len(items)], "tokens": [tokens], "worker": [worker]})

"""The one store writer of an ingestion: merges shards in a background thread while the next batch is captured.

Capture (torch) and the store's work (building Arrow tables, DuckDB inserts, compression) overlap: the capture loop
hands each batch to `ShardMerger.put`, which returns at once unless ``depth`` batches are already waiting (so memory
stays bounded by ``depth`` batches), and a single thread builds each batch's shard and merges it in its own
transaction. Every engine (inline, Ray) feeds the same merger, so there is one way into the store.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import duckdb
import numpy as np

from geomap.capture.journey import Journey, PromptFailure
from geomap.store.compaction import compact_if_needed
from geomap.store.shards import Shard, build_shard, merge_shard
from geomap.store.writer import PromptSpec

Item = tuple[PromptSpec, str, Journey | PromptFailure]
_STOP = object()


@dataclass(frozen=True)
class Merged:
    """What one merge did: the batch's items (or the shard's keys) and the counts `merge_shard` returned."""

    items: tuple[Item, ...]
    counts: dict
    shard_id: str


class ShardMerger:
    """Merge shards into one store connection from a background thread, in the order they are put.

    Use as a context manager; leaving the block waits for every queued batch and re-raises the first error the
    thread met (after which nothing more is merged).

    Args:
        con: The store's read-write connection (used by the merging thread only, while the merger is open).
        run_id: The run new prompts belong to.
        vector_dtype: Storage of state vectors, for shards built here.
        vocab_text: Token texts by id (``lens_stats.top1_token``).
        meta: Facts recorded in each shard built here (model identity, capture config).
        on_merged: Called in the merging thread after every merge.
        depth: Batches that may wait for the thread before `put` blocks.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, run_id: int, vector_dtype: str,
                 vocab_text: np.ndarray | None = None, meta: dict | None = None,
                 on_merged: Callable[[Merged], None] | None = None, depth: int = 2):
        self.con, self.run_id, self.vector_dtype = con, run_id, vector_dtype
        self.vocab_text, self.meta, self.on_merged = vocab_text, meta or {}, on_merged
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="geomap-merger", daemon=True)

    def __enter__(self) -> ShardMerger:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        if self._error is not None and exc is None:
            raise self._error

    def put(self, batch: Sequence[Item] | Shard) -> None:
        """Queue a batch of captured prompts (built into a shard by the thread) or a ready shard."""
        if self._error is not None:
            raise self._error
        self._queue.put(batch)

    def _work(self) -> None:
        while (batch := self._queue.get()) is not _STOP:
            if self._error is not None:
                continue  # drain: nothing more is merged after an error
            try:
                shard = batch if isinstance(batch, Shard) else build_shard(batch, self.vector_dtype, self.meta,
                                                                           self.vocab_text)
                counts = merge_shard(self.con, shard, self.run_id, self.vocab_text)
                compact_if_needed(self.con)
                if self.on_merged is not None:
                    self.on_merged(Merged(() if isinstance(batch, Shard) else tuple(batch), counts, shard.shard_id))
            except BaseException as exc:  # handed to the caller at its next put or at exit
                self._error = exc

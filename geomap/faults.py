"""Fault injection for tests: SIGKILL this process at a named point when ``$GEOMAP_KILL_AT`` names it.

Contract:
    ``GEOMAP_KILL_AT="NAME"`` kills the process (SIGKILL, no cleanup, no flush: as a power cut would) the first
    time `kill_point` is called with ``NAME``; ``"NAME@N"`` kills it at the N-th call (1-based) with that name.
    Several comma-separated entries may be given (``"a@2,b"``); the first one reached kills. Without the variable
    `kill_point` is a dictionary lookup and nothing else: it never raises and changes nothing.

    A kill point marks a *commit boundary*: the moment just before or just after a durable step (a DuckDB
    commit, an fsync'd temp file, an atomic rename). A test kills there, reruns the same command, and checks that
    the store equals an uninterrupted run's and that ``geomap index verify`` passes. Every name used in geomap is
    listed in `POINTS`; a test walks that list, so a new boundary must be added there too.

Names (the process stops *at* the call, so "before X" means X did not happen):
    ``vocab.inserted``: the model's vocabulary rows are inserted, its norm names not yet (one transaction).
    ``run.started``: the ``running`` run row is committed, no batch yet.
    ``batch.inserted``: a batch's rows are inserted, its transaction not committed.
    ``batch.committed``: a batch's transaction committed.
    ``segment.temp_written``: a vector segment's temp file is written and fsynced, not yet renamed into place.
    ``segment.cataloged``: a batch's segments are renamed into place and cataloged, its transaction not committed.
    ``segment.compacted``: a compacted (or rewritten) segment is in place and cataloged, its transaction not
        committed.
    ``segment.migrated``: a migrated segment is in place and its rows deleted, its transaction not committed.
    ``scalars.backfilled``: a segments store written before ``internal.state_scalars`` has the table created and
    filled from its segments, the transaction not committed.
    ``index.temp_written``: an index file's temp copy is written and fsynced, its manifest row not committed.
    ``index.manifest_committed``: the manifest row is committed, the temp file not yet renamed into place.
    ``index.published``: the index file is renamed into place (one layer done).
    ``run.indexed``: every index is in step with DuckDB, the run row not yet marked ``done``.

An intervention sweep (`geomap.ingest.interventions`) has its own boundaries, in `SWEEP_POINTS` (walked by
``tests/intervene/test_intervene_store.py``), besides ``run.started``:
    ``intervene.batch_inserted``: a batch's ledger, delta and effects rows are inserted, not committed.
    ``intervene.batch_committed``: that transaction committed.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "GEOMAP_KILL_AT"

POINTS = ("vocab.inserted", "run.started", "batch.inserted", "batch.committed", "segment.temp_written",
          "segment.cataloged", "segment.compacted", "segment.migrated", "scalars.backfilled", "index.temp_written",
          "index.manifest_committed", "index.published", "run.indexed")

SWEEP_POINTS = ("intervene.batch_inserted", "intervene.batch_committed")

_calls: Counter[str] = Counter()


def _targets(value: str) -> dict[str, int]:
    out = {}
    for entry in value.split(","):
        name, _, nth = entry.strip().partition("@")
        if name:
            out[name] = int(nth) if nth.strip().isdigit() else 1
    return out


def kill_point(name: str) -> None:
    """SIGKILL this process if ``$GEOMAP_KILL_AT`` names this point (and this is the call it counts to)."""
    value = os.environ.get(ENV)
    if not value:
        return
    _calls[name] += 1
    if _targets(value).get(name) == _calls[name]:
        os.kill(os.getpid(), signal.SIGKILL)

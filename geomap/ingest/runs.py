"""Runs: the run rows, model identity and model-level metadata (vocabulary, norm names) an ingestion writes."""

from __future__ import annotations

import json
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from geomap.capture.config import CaptureConfig
from geomap.capture.tokens import describe_tokens
from geomap.errors import GeomapError
from geomap.faults import kill_point
from geomap.models.loading import LoadedModel
from geomap.store.db import rollback_quietly
from geomap.store.handle import Store


@dataclass(frozen=True)
class RunSummary:
    """What one ingestion run did."""

    run_id: int | None
    stored: int
    skipped: int
    failed: int
    tokens: int
    seconds: float
    failures: tuple[str, ...]


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


def reserve_run(con, pipeline: str) -> int:
    """Insert a ``queued`` run row (filled in when its ingestion starts) and return its id.

    One statement picks the id and inserts the row; `start_run` fills a queued row in place, so no other writer
    ever sees the largest id disappear and hands it out twice.
    """
    return int(con.execute("INSERT INTO runs (id, started_at, status, pipeline) SELECT coalesce(max(id), 0) + 1, "
                           "now(), 'queued', ? FROM runs RETURNING id", [pipeline]).fetchall()[0][0])


def resumable_run(con, loaded: LoadedModel, config: CaptureConfig, vector_dtype: str, pipeline: str) -> int | None:
    """The store's last run if a kill or a failure stopped it and it ran this same command; else None.

    Same command: same pipeline name, weights, capture options and vector dtype. A rerun finishes such a run under
    its own id, so a killed run plus one rerun leaves the store as one uninterrupted run would.
    """
    rows = con.execute("SELECT id, status, weights_sha256, capture_config::VARCHAR, vector_dtype, pipeline FROM runs "
                       "ORDER BY id DESC LIMIT 1").fetchall()
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


def mark_failed(store: Store, con, run_id: int) -> None:
    """Mark a run ``failed`` after an error, best effort, never raising over the error that led here.

    DuckDB may have invalidated ``con`` after the error, so a fresh cursor of the store tries again. On a full disk
    both may fail: the next run then finds the run ``running`` and takes it up again.
    """
    def mark(c) -> None:
        rollback_quietly(c)
        c.execute("UPDATE runs SET status = 'failed', finished_at = now() WHERE id = ?", [run_id])

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


def summary_json(summary: RunSummary) -> str:
    """A run summary as JSON."""
    return json.dumps(summary.__dict__)

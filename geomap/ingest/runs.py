"""Runs: the run rows, model identity and model-level metadata (vocabulary, norm names) an ingestion writes."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from geomap.capture.config import CaptureConfig
from geomap.capture.tokens import describe_tokens
from geomap.models.loading import LoadedModel


@dataclass(frozen=True)
class RunSummary:
    """What one ingestion run did."""

    run_id: int
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
    """Store the model's vocabulary (id, display text, raw bytes) once per weights hash."""
    sha = loaded.weights_hash
    if con.execute("SELECT count(*) FROM vocab WHERE weights_sha256 = ?", [sha]).fetchall()[0][0]:
        return
    ids = np.arange(loaded.anatomy.vocab_size, dtype=np.int64)
    tokens = describe_tokens(loaded.tokenizer, ids[ids < len(loaded.tokenizer)])
    n = len(tokens)
    table = pa.table({"weights_sha256": pa.array([sha] * n), "token_id": pa.array(tokens.ids.astype(np.int32)),
                      "text": pa.array(list(tokens.texts)), "raw": pa.array(list(tokens.raw), pa.binary()),
                      "special": pa.array(tokens.special)})
    con.register("_geomap_vocab", table)
    con.execute("INSERT INTO vocab SELECT * FROM _geomap_vocab")
    con.unregister("_geomap_vocab")
    a = loaded.anatomy
    names = [*a.spec.layer_norms, "final_norm"]
    con.executemany("INSERT OR IGNORE INTO norm_names VALUES (?, ?, ?)",
                    [(a.model_type, i, name) for i, name in enumerate(names)])


def reserve_run(con, pipeline: str) -> int:
    """Insert a ``queued`` run row (filled in when its ingestion starts) and return its id."""
    run_id = con.execute("SELECT coalesce(max(id), 0) + 1 FROM runs").fetchall()[0][0]
    con.execute("INSERT INTO runs (id, started_at, status, pipeline) VALUES (?, now(), 'queued', ?)",
                [run_id, pipeline])
    return int(run_id)


def start_run(con, loaded: LoadedModel, config: CaptureConfig, vector_dtype: str, pipeline: str,
              run_id: int | None = None) -> int:
    """Mark runs left ``running`` as interrupted and insert a ``running`` run row (or fill a queued one)."""
    con.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")  # we hold the write lock
    if run_id is None:
        run_id = con.execute("SELECT coalesce(max(id), 0) + 1 FROM runs").fetchall()[0][0]
    else:
        con.execute("DELETE FROM runs WHERE id = ? AND status = 'queued'", [run_id])
    a = loaded.anatomy
    con.execute(
        "INSERT INTO runs VALUES (?, now(), NULL, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
        [run_id, loaded.name, a.model_type, loaded.weights_hash, str(loaded.dtype).removeprefix("torch."),
         vector_dtype, config.to_json(), pipeline, a.n_layers, a.d_model, a.n_heads, a.n_kv_heads, a.head_dim,
         a.vocab_size])
    return run_id


def summary_json(summary: RunSummary) -> str:
    """A run summary as JSON."""
    return json.dumps(summary.__dict__)

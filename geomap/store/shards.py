"""Shards: a batch of captured prompts as self-contained Arrow tables that any process can write and one writer merges.

A shard holds the rows a batch of prompts adds to every capture table, keyed by prompt key instead of store ids:
its ``prompts`` table lists the prompts (``key``, text, provenance, status), and every other table's ``prompt_id``
is a row index into it (``states.id`` is likewise a row index into the shard's states). Ids are assigned only when
the one writer merges the shard into the store (`merge_shard`), in one transaction that skips every prompt whose key
is already stored and records the shard's id in ``merged_shards``: merging a shard twice, or a prompt that two shards
share, changes nothing.

Inline ingestion builds a shard per batch and merges it at once; a distributed worker writes it to a folder
(`write_shard`: Parquet files and a manifest, published by one atomic rename) for the writer to `read_shard` and
merge. The store stage knows no models: a shard is built from `Journey` objects (plain numpy data).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geomap.capture.journey import Journey, PromptFailure
from geomap.digest import sha256_of
from geomap.errors import GeomapError
from geomap.faults import kill_point
from geomap.store import facts
from geomap.store.db import rollback_quietly
from geomap.store.files import fsync_path
from geomap.store.segments import SEGMENT_TABLES, layout, next_state_id, store_segments
from geomap.store.writer import TABLES, PromptSpec, check_finite, journey_tables

SHARD_FORMAT = 1
MANIFEST = "manifest.json"

PROMPTS_SCHEMA = pa.schema([
    ("key", pa.string()), ("text", pa.string()), ("source", pa.string()), ("source_id", pa.string()),
    ("tags", pa.list_(pa.string())), ("n_tokens", pa.int32()), ("status", pa.string()), ("error", pa.string()),
    ("truncated", pa.bool_()), ("parent_id", pa.int32()), ("decoding", pa.string()),
])


class ShardError(GeomapError):
    """A shard file is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class Shard:
    """A batch of captured prompts, ready to merge.

    Attributes:
        tables: Arrow tables by store table name: ``prompts`` (`PROMPTS_SCHEMA`, one row per prompt, failures
            included) and the capture tables of `geomap.store.writer.TABLES`, whose ``prompt_id`` is a row index into
            ``prompts`` and whose ``states.id`` is a row index into ``states``.
        meta: Plain JSON-able facts about the batch (``vector_dtype``, and whatever the producer adds: model
            identity, capture config), kept in the manifest.
    """

    tables: dict[str, pa.Table]
    meta: dict = field(default_factory=dict)

    @property
    def keys(self) -> tuple[str, ...]:
        """The prompt keys, in row order."""
        return tuple(self.tables["prompts"].column("key").to_pylist())

    @property
    def shard_id(self) -> str:
        """A content id: sha256 of the prompt keys and the meta (the same batch always gets the same id)."""
        payload = json.dumps([self.keys, self.meta], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    @property
    def nbytes(self) -> int:
        """Bytes of the Arrow buffers."""
        return sum(t.nbytes for t in self.tables.values())


def build_shard(items: Sequence[tuple[PromptSpec, str, Journey | PromptFailure]], vector_dtype: str,
                meta: dict | None = None, vocab_text: np.ndarray | None = None) -> Shard:
    """Turn captured prompts into a shard.

    Args:
        items: ``(spec, key, journey or failure)`` per prompt. Failures and non-finite journeys become prompts with
            status ``'error'`` and no other rows.
        vector_dtype: ``"float32"`` or ``"bfloat16"`` for state vectors.
        meta: Facts to keep with the shard (``vector_dtype`` is added).
        vocab_text: The model's token texts by id, for ``lens_stats.top1_token`` (else filled at merge).

    Returns:
        The shard.
    """
    rows: dict[str, list] = {name: [] for name in PROMPTS_SCHEMA.names}
    parts: dict[str, list[pa.Table]] = {name: [] for name in TABLES}
    next_state = 0
    for local, (spec, key, result) in enumerate(items):
        failed = isinstance(result, PromptFailure)
        reason = result.reason if failed else check_finite(result)
        values = (key, spec.text, spec.source, spec.source_id, list(spec.tags),
                  None if failed else len(result.tokens), "error" if reason else "done", reason,
                  None if failed else bool(result.truncated), spec.parent_id, spec.decoding)
        for name, value in zip(PROMPTS_SCHEMA.names, values):
            rows[name].append(value)
        if reason is None:
            tables = journey_tables(result, local, next_state, vector_dtype, spec.generated_from, vocab_text)
            next_state += tables["states"].num_rows
            for name, table in tables.items():
                parts[name].append(table)
    tables = {"prompts": pa.table(rows, schema=PROMPTS_SCHEMA)}
    tables.update({name: pa.concat_tables(p) for name, p in parts.items() if p})
    return Shard(tables, {**(meta or {}), "vector_dtype": vector_dtype})


def write_shard(shard: Shard, folder: str | Path) -> Path:
    """Write a shard as ``<folder>/<shard_id>/`` (a Parquet file per table and ``manifest.json``), atomically.

    The files are written into a temporary folder, fsynced, and published by one rename, so a reader sees a whole
    shard or none. Writing a shard that is already there keeps the existing copy.

    Returns:
        The shard's folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / shard.shard_id
    if (final / MANIFEST).is_file():
        return final
    tmp = folder / f".{shard.shard_id}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for name, table in shard.tables.items():
        path = tmp / f"{name}.parquet"
        pq.write_table(table, path, compression="zstd", compression_level=1)
        files[name] = {"rows": table.num_rows, "sha256": sha256_of(path)}
    manifest = {"format": SHARD_FORMAT, "shard_id": shard.shard_id, "keys": list(shard.keys), "meta": shard.meta,
                "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for path in tmp.iterdir():
        fsync_path(path)
    fsync_path(tmp)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / MANIFEST).is_file():  # not a concurrent writer of the same shard: a real failure
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_path(folder)
    return final


def read_shard(path: str | Path) -> Shard:
    """Read a shard folder written by `write_shard`, checking every file against the manifest.

    Raises:
        ShardError: No manifest, a missing file, or a file whose checksum or row count differs.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path} is not a complete shard (no readable {MANIFEST}: {exc})") from None
    if manifest.get("format") != SHARD_FORMAT:
        raise ShardError(f"{path}: shard format {manifest.get('format')!r}, this geomap reads {SHARD_FORMAT}")
    tables = {}
    for name, info in manifest["files"].items():
        file = path / f"{name}.parquet"
        if not file.is_file() or sha256_of(file) != info["sha256"]:
            raise ShardError(f"{file} is missing or does not match the shard's manifest")
        tables[name] = pq.read_table(file)
    shard = Shard(tables, manifest["meta"])
    if shard.shard_id != manifest["shard_id"]:
        raise ShardError(f"{path}: its tables do not match the shard id in its manifest")
    return shard


def merge_shard(con: duckdb.DuckDBPyConnection, shard: Shard, run_id: int,
                vocab_text: np.ndarray | None = None,
                within: Callable[[duckdb.DuckDBPyConnection, dict[str, int]], None] | None = None) -> dict:
    """Merge a shard into the store in one transaction, idempotently.

    Prompts whose key is already stored (or that appear twice in the shard) are skipped; a shard already recorded in
    ``merged_shards`` is skipped whole.

    Args:
        con: Read-write connection (no transaction open).
        shard: The shard.
        run_id: The run its new prompts belong to.
        vocab_text: Token texts by id for ``lens_stats.top1_token`` when the shard lacks them.
        within: Called inside the transaction with ``{key: prompt id}`` of the prompts it adds, to store rows that
            belong to them (a generation's decisions) in the same commit.

    Returns:
        Rows added per table, ``skipped`` (prompts already stored), ``errors`` ({prompt text: reason} for prompts
        stored as errors) and ``tokens`` (the tokens of the prompts it added as journeys).
    """
    prompts = shard.tables["prompts"]
    con.execute("BEGIN TRANSACTION")
    try:
        if con.execute("SELECT count(*) FROM merged_shards WHERE shard_id = ?", [shard.shard_id]).fetchall()[0][0]:
            con.execute("ROLLBACK")
            return {"prompts": 0, "skipped": prompts.num_rows, "errors": {}, "tokens": 0}
        keys = prompts.column("key").to_pylist()
        stored = {r[0] for r in con.execute("SELECT key FROM prompts WHERE key IN (SELECT unnest(?))",
                                            [keys]).fetchall()}
        next_prompt = con.execute("SELECT coalesce(max(id), 0) + 1 FROM prompts").fetchall()[0][0]
        ids = np.full(len(keys), -1, np.int64)
        for local, key in enumerate(keys):
            if key not in stored:
                ids[local] = next_prompt
                next_prompt += 1
                stored.add(key)
        keep = ids >= 0
        new = prompts.filter(pa.array(keep)).append_column("id", pa.array(ids[keep], pa.int32())).append_column(
            "run_id", pa.array(np.full(int(keep.sum()), run_id, np.int32)))
        _insert(con, "prompts", new)
        counts: dict = {"prompts": new.num_rows, "skipped": int((~keep).sum())}
        counts["errors"] = {t: e for t, e, s in zip(new.column("text").to_pylist(), new.column("error").to_pylist(),
                                                     new.column("status").to_pylist()) if s == "error"}
        statuses = new.column("status").to_pylist()
        counts["tokens"] = sum(n or 0 for n, s in zip(new.column("n_tokens").to_pylist(), statuses) if s != "error")
        in_segments = layout(con) == "segments"
        next_state = next_state_id(con) if in_segments else con.execute(
            "SELECT coalesce(max(id), 0) + 1 FROM states").fetchall()[0][0]
        bulk: dict[str, pa.Table] = {}
        for name in TABLES:
            table = shard.tables.get(name)
            if table is None or not table.num_rows:
                continue
            table = _rekey(table, ids, keep)
            if name == "states":
                table = table.set_column(table.schema.get_field_index("id"), "id",
                                         pa.array(np.arange(next_state, next_state + table.num_rows, dtype=np.int64)))
            if name == "lens_stats" and vocab_text is not None and table.column("top1_token").null_count:
                table = table.set_column(table.schema.get_field_index("top1_token"), "top1_token",
                                         pa.array(vocab_text[table.column("top1_id").to_numpy()], pa.string()))
            if in_segments and name in SEGMENT_TABLES:
                bulk[name] = table
            else:
                _insert(con, name, table, run_id)
            counts[name] = table.num_rows
        if bulk:
            store_segments(con, bulk)
        facts.fill_for(con, ids[keep])
        if within is not None:
            within(con, {key: int(i) for key, i in zip(keys, ids) if i >= 0})
        con.execute("INSERT INTO merged_shards VALUES (?, now(), ?, ?)", [shard.shard_id, run_id, counts["prompts"]])
        kill_point("batch.inserted")
        con.execute("COMMIT")
    except BaseException:
        rollback_quietly(con)
        raise
    kill_point("batch.committed")
    return counts


def write_batch(con: duckdb.DuckDBPyConnection, run_id: int, vector_dtype: str,
                items: Sequence[tuple[PromptSpec, str, Journey | PromptFailure]],
                vocab_text: np.ndarray | None = None,
                within: Callable[[duckdb.DuckDBPyConnection, dict[str, int]], None] | None = None) -> dict:
    """Build a shard of ``items`` and merge it at once (the inline path: one transaction per batch)."""
    return merge_shard(con, build_shard(items, vector_dtype, vocab_text=vocab_text), run_id, vocab_text, within)


def _rekey(table: pa.Table, ids: np.ndarray, keep: np.ndarray) -> pa.Table:
    """Keep the rows of new prompts and turn their shard row indices into store prompt ids."""
    local = table.column("prompt_id").to_numpy()
    if not keep.all():
        mask = keep[local]
        table = table.filter(pa.array(mask))
        local = local[mask]
    return table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id",
                            pa.array(ids[local].astype(np.int32)))


def _insert(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table, run_id: int | None = None) -> None:
    con.register("_geomap_shard", table)
    try:
        if name == "lens_stats" and table.column("top1_token").null_count:  # the top-1 text from the store's vocab
            con.execute("INSERT INTO lens_stats BY NAME SELECT b.* REPLACE (v.text AS top1_token) "
                        "FROM _geomap_shard b LEFT JOIN vocab v ON v.token_id = b.top1_id AND "
                        "v.weights_sha256 = (SELECT weights_sha256 FROM runs WHERE id = ?)", [run_id])
        else:
            con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM _geomap_shard")  # noqa: S608 (fixed names)
    finally:
        con.unregister("_geomap_shard")


def shard_paths(folder: str | Path) -> list[Path]:
    """The complete shards in a folder (those with a manifest), oldest first; temporary folders are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def filter_unmerged(con: duckdb.DuckDBPyConnection, shard_ids: Sequence[str]) -> list[str]:
    """The ids among ``shard_ids`` not yet recorded in ``merged_shards``."""
    done = {r[0] for r in con.execute("SELECT shard_id FROM merged_shards WHERE shard_id IN (SELECT unnest(?))",
                                      [list(shard_ids)]).fetchall()}
    return [s for s in shard_ids if s not in done]

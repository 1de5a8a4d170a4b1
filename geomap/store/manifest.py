"""The manifest of a store's derived FAISS indexes: commits, file and statistics checks, interrupted builds.

A build's commit, the checks of a file and its standardisation against the manifest, and finishing (or undoing)
what an interrupted build left behind.

A build writes ``<name>.tmp`` (fsynced), commits the manifest row, its sha256 and a checksum of its
standardisation (``store_meta`` key ``faiss_stats_sha256:L<layer>``) in one DuckDB transaction, then renames the
temp file into place and fsyncs the folder. Kill points (`geomap.faults`) mark each of these boundaries.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import faiss
import numpy as np

from geomap.digest import sha256_of
from geomap.faults import kill_point
from geomap.store.db import StoreError, index_dir, rollback_quietly, storage_error
from geomap.store.files import publish, write_temp

log = logging.getLogger(__name__)

REBUILD = "Run `geomap index rebuild` to rebuild it from the store."
COLUMNS = "layer, kind, path, dim, metric, ntotal, max_id, sha256, mean, std, built_at"


class IndexCorruptError(StoreError):
    """A derived index file is missing or does not match the sha256 recorded in its manifest row."""


def manifest_rows(con: duckdb.DuckDBPyConnection, layers: list[int] | None = None) -> dict[int, dict]:
    """The state indexes' manifest rows by layer (``layers``: only these layers' rows)."""
    where = "" if layers is None else " AND layer IN (SELECT unnest(?))"
    rows = con.execute(f"SELECT {COLUMNS} FROM faiss_manifest WHERE kind LIKE 'states%'{where} ORDER BY layer",
                       [] if layers is None else [[int(x) for x in layers]]).fetchall()
    return {int(r[0]): dict(zip(COLUMNS.split(", "), r)) for r in rows}


def commit_index(con: duckdb.DuckDBPyConnection, db_path: Path, layer: int, index: faiss.Index, kind: str,
            mean: np.ndarray, std: np.ndarray, max_id: int) -> dict:
    """Write the index (temp + fsync), commit its manifest row, then rename it into place."""
    folder = index_dir(Path(db_path))
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"states-L{layer:03d}.faiss"
    tmp = final.with_name(final.name + ".tmp")
    try:
        row = {
            "layer": layer, "kind": f"states:{kind}", "path": final.name, "dim": int(index.d),
            "metric": "inner_product", "ntotal": int(index.ntotal), "max_id": int(max_id),
            "sha256": write_temp(tmp, index), "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "built_at": datetime.now(UTC).replace(tzinfo=None),
        }
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a half-written temp file (a full disk) is never left behind
        if (error := storage_error(exc, tmp)) is not None:
            raise error from None
        raise
    kill_point("index.temp_written")
    con.begin()
    try:
        con.execute("DELETE FROM faiss_manifest WHERE layer = ? AND kind LIKE 'states%'", [layer])
        con.execute(f"INSERT INTO faiss_manifest ({COLUMNS}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
        con.execute("DELETE FROM store_meta WHERE key = ?", [_stats_key(layer)])
        con.execute("INSERT INTO store_meta VALUES (?, ?)", [_stats_key(layer), _stats_sha256(row)])
        con.commit()
    except BaseException as exc:
        rollback_quietly(con)
        tmp.unlink(missing_ok=True)
        if (error := storage_error(exc, db_path)) is not None:
            raise error from None
        raise
    kill_point("index.manifest_committed")
    publish(tmp, final)
    kill_point("index.published")
    return row


def finish_interrupted(con: duckdb.DuckDBPyConnection, db_path: Path) -> None:
    """Finish or undo what an interrupted index build left in the index folder.

    A temp file whose sha256 is its layer's manifest row's (a kill between the manifest commit and the rename)
    is renamed into place; any other temp file (a kill before the manifest commit, a full disk) is deleted: the
    manifest still describes the previous file, which the sync then extends or rebuilds.
    """
    folder = index_dir(Path(db_path))
    if not folder.is_dir():
        return
    by_name = {row["path"]: row for row in manifest_rows(con).values()}
    for tmp in sorted(folder.glob("*.faiss.tmp")):
        row = by_name.get(tmp.name.removesuffix(".tmp"))
        final = folder / tmp.name.removesuffix(".tmp")
        if row is not None and sha256_of(tmp) == row["sha256"] and not (
                final.exists() and sha256_of(final) == row["sha256"]):
            log.info("Finishing an interrupted index build: %s -> %s", tmp, final)
            publish(tmp, final)
        else:
            tmp.unlink(missing_ok=True)


def _stats_key(layer: int) -> str:
    return f"faiss_stats_sha256:L{layer:03d}"


def _stats_sha256(row: dict) -> str:
    """sha256 of a manifest row's standardisation (mean, std as float32) and the fields a search relies on."""
    h = hashlib.sha256(f"{row['layer']}|{row['kind']}|{row['dim']}|{row['ntotal']}|{row['max_id']}|".encode())
    for column in ("mean", "std"):
        h.update(np.asarray(row[column] or [], dtype=np.float32).tobytes())
        h.update(b"|")
    return h.hexdigest()


def stats_problem(con: duckdb.DuckDBPyConnection, row: dict) -> str | None:
    """Why a manifest row's standardisation cannot be trusted (wrong length, not finite, zero std, altered)."""
    layer, dim = row["layer"], row["dim"]
    mean, std = (np.asarray(row[c] or [], dtype=np.float64) for c in ("mean", "std"))
    if len(mean) != dim or len(std) != dim:
        why = f"its mean has {len(mean)} values and its std {len(std)}, for width {dim}"
    elif not (np.isfinite(mean).all() and np.isfinite(std).all()):
        why = "its mean or std is not finite"
    elif (std <= 0).any():
        why = f"its std has {int((std <= 0).sum())} values at or below zero"
    else:
        stored = con.execute("SELECT value FROM store_meta WHERE key = ?", [_stats_key(layer)]).fetchall()
        if not stored or stored[0][0] == _stats_sha256(row):
            return None  # indexes built before the checksum existed have only the checks above
        why = "it does not match the checksum written with it (the manifest row was altered)"
    return f"Layer {layer}: the manifest's standardisation is damaged: {why}. {REBUILD}"


def manifest_missing(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the store lacks its ``faiss_manifest`` table (dropped by hand)."""
    return not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'faiss_manifest' AND "
                           "database_name = current_database() AND schema_name = 'main'").fetchall()[0][0]


def file_problem(folder: Path, row: dict, roll_forward: bool) -> str | None:
    """Why an index file does not match its manifest row, or None (after finishing an interrupted rename)."""
    final = folder / row["path"]
    expected = row["sha256"]
    actual = sha256_of(final) if final.exists() else None
    if actual == expected:
        return None
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists() and sha256_of(tmp) == expected:
        if not roll_forward:
            return f"Index file {final}: an interrupted build left {tmp.name}; opening the index will finish it."
        log.info("Finishing an interrupted index build: %s -> %s", tmp, final)
        publish(tmp, final)
        return None
    if actual is None:
        state = "the file is missing"
    elif final.stat().st_size == 0:
        state = "the file is empty (truncated)"
    else:
        state = f"actual sha256 {actual} ({final.stat().st_size} bytes; truncated or damaged)"
    return f"Index file {final} does not match the store's manifest: expected sha256 {expected}, {state}. {REBUILD}"

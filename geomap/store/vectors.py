"""FAISS indexes derived from a store: one index of residual states per layer (vocabulary indexes: `vocab_index`).

What similarity means:
    Raw residuals are dominated by a few huge dimensions, so a raw cosine mostly compares those. Each layer's vectors
    are standardised per dimension, ``(x - mean) / std``, with mean and std over that layer's states computed at build
    time (frozen in ``faiss_manifest.mean``/``std``: a rebuild recomputes them, a sync reuses them), then
    L2-normalised, and searched by inner product: a similarity is the cosine of standardised states, in [-1, 1].
    `StateIndex.search` puts queries through the same frozen transform.

Index kinds (manifest ``kind`` ``states:flat|ivf|hnsw``; FAISS ids are ``states.id``):
    ``auto`` picks exact ``IndexFlatIP`` (in ``IndexIDMap2``) below ``threshold`` vectors per layer, else
    ``IndexIVFScalarQuantizer`` holding float16 vectors (half the bytes to scan per probed list, the same recall;
    similarities move by up to ~1e-3): nlist = 4·sqrt(n) (at most n/39 and 4096), trained on ≤ 50·nlist vectors sampled
    by id (the same sample in any scan order), nprobe the smallest of 1, 2, 3, 4, 6, 8, 12, … with recall@10 ≥ 0.97
    against exact search for 256 stored states (self excluded), saved in the file (0.97 on a 256-query sample keeps
    recall on other queries above the 0.95 promised). Fewer queries than threads split each query's lists between
    threads. A sync only appends with the frozen stats: a flat index grown past the threshold stays flat (exact, slower)
    and an IVF keeps its centroids and nprobe, until ``geomap index rebuild``. Builds and syncs read many layers from
    one scan of the states (`geomap.store.index_build`).

Files and crashes:
    ``states-L{layer:03d}.faiss`` in `index_dir`. A build writes ``<name>.tmp`` (fsynced), commits the manifest row
    and its sha256 in a DuckDB transaction, then renames the temp file into place and fsyncs the folder. Opening
    checks the sha256 and the standardisation's checksum: a leftover temp file with the manifest's sha256 finishes
    an interrupted rename; any other mismatch raises `IndexCorruptError`. A bad index is never silently replaced.
    Every sync and rebuild first finishes or removes what an interrupted build left (`manifest.finish_interrupted`),
    so after any command that completes, ``geomap index verify`` passes. A rebuild needs DuckDB's states only: it
    recreates a dropped manifest table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import faiss
import numpy as np

from geomap.store.db import StoreError, ensure_schema, index_dir
from geomap.store.index_build import build_layers, extend_layers, standardise
from geomap.store.manifest import (
    REBUILD,
    IndexCorruptError,
    file_problem,
    finish_interrupted,
    manifest_missing,
    manifest_rows,
    stats_problem,
)
from geomap.store.scalars import relation

__all__ = ["IndexCorruptError", "StateIndex", "build_state_indexes", "open_state_index", "sync_state_indexes",
           "verify_indexes"]

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 50_000
SMALL_SEARCH = 1 << 26  # queries × stored vectors × width at most, for a flat search on one thread


@dataclass
class StateIndex:
    """One layer's state index with its frozen standardisation."""

    layer: int
    kind: str
    path: Path
    index: faiss.Index
    mean: np.ndarray
    std: np.ndarray

    def prepare(self, raw_vectors: np.ndarray) -> np.ndarray:
        """Standardise and L2-normalise raw residuals (n, d) as the index's vectors were."""
        return standardise(np.atleast_2d(raw_vectors), self.mean, self.std)

    def search(self, raw_vectors: np.ndarray, k: int,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest stored states to raw residuals by cosine of standardised states.

        Args:
            raw_vectors: (n, d) raw residuals (float32).
            k: neighbours per query; slots beyond the index's size (or the allowed set) hold id -1.
            allowed: Optional ``states.id`` values the search is restricted to (a FAISS ID selector).

        Returns:
            ``ids`` (n, k) int64 ``states.id``, best first, and ``sims`` (n, k) float32.
        """
        x = np.atleast_2d(raw_vectors)
        if x.shape[1] != self.index.d:
            raise ValueError(f"Queries have width {x.shape[1]}; the layer {self.layer} index has {self.index.d}.")
        params = None if allowed is None else _search_params(self.index, np.asarray(allowed, dtype=np.int64))
        set_parallelism(self.index, len(x))
        with one_thread(_small(self.index, len(x))):
            sims, ids = self.index.search(self.prepare(x), k, params=params)
        return ids.astype(np.int64), sims.astype(np.float32)


def _small(index: faiss.Index, n_queries: int) -> bool:
    """Whether a search is a few queries over a small flat index (FAISS scores each such query on one thread)."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    return (isinstance(inner, faiss.IndexFlat) and n_queries < faiss.cvar.distance_compute_blas_threshold
            and index.ntotal * n_queries * index.d <= SMALL_SEARCH)


@contextmanager
def one_thread(active: bool = True) -> Iterator[None]:
    """FAISS on one OpenMP thread for the block (the calling thread's setting; others keep theirs).

    A small flat search takes microseconds, but its parallel region wakes a team of threads first, which costs
    milliseconds on a busy machine (one query over 672 states: 8 ms with 2 threads, 0.06 ms with one, at load 10).
    Each query is scored by one thread either way, so the results are the same.
    """
    if not active:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def set_parallelism(index: faiss.Index, n_queries: int) -> None:
    """Spread an IVF search over the threads the right way for ``n_queries``.

    FAISS's default splits queries between threads, so a single query runs on one core; with fewer queries than
    threads, each query's probed lists are split instead (``parallel_mode`` 1: 1.5-1.7x faster single queries here).
    """
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexIVF):
        inner.parallel_mode = 1 if n_queries < faiss.omp_get_max_threads() else 0


def _search_params(index: faiss.Index, allowed: np.ndarray) -> faiss.SearchParameters:
    """Search parameters restricting ``index`` to ``allowed`` ids, keeping its own nprobe / efSearch."""
    selector = faiss.IDSelectorBatch(allowed)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=selector, nprobe=inner.nprobe)
    elif isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    else:
        params = faiss.SearchParameters(sel=selector)
    params._keep = (selector, allowed)  # the selector must outlive the search
    return params


def build_state_indexes(con: duckdb.DuckDBPyConnection, db_path: Path, layers: list[int] | None = None,
                        kind: str = "auto", threshold: int = DEFAULT_THRESHOLD) -> list[dict]:
    """Rebuild state indexes from DuckDB, recomputing each layer's standardisation.

    Args:
        con: read-write connection to the store.
        db_path: the store's DuckDB file (indexes go to `index_dir`).
        layers: layers to build; None for every layer with states. Layers without states are skipped.
        kind: 'auto' (flat below ``threshold``, else IVF), 'flat', 'ivf' or 'hnsw'.
        threshold: vectors per layer from which 'auto' picks IVF.

    Returns:
        The manifest rows written, one per built layer.
    """
    if manifest_missing(con):  # rebuild from DuckDB alone: recreate the manifest table first
        con.execute("DELETE FROM store_meta WHERE key = 'schema_sha256'")
        ensure_schema(con)
    finish_interrupted(con, db_path)
    counts = {int(layer): int(n) for layer, n in
              con.execute(f"SELECT layer, count(*) FROM {relation(con)} GROUP BY layer").fetchall()}  # noqa: S608
    wanted = counts if layers is None else {int(layer): counts.get(int(layer), 0) for layer in layers}
    return build_layers(con, db_path, wanted, kind, threshold)


def sync_state_indexes(con: duckdb.DuckDBPyConnection, db_path: Path, kind: str = "auto",
                       threshold: int = DEFAULT_THRESHOLD) -> int:
    """Append states with id > the manifest's max_id to each layer's index, with its frozen standardisation.

    A layer without an index is built (``kind``/``threshold`` apply); one whose older states changed (count of
    ids ≤ max_id ≠ ntotal) is rebuilt with a warning. Existing indexes keep their kind: a flat index that grows past
    ``threshold`` stays flat until a rebuild.

    Returns:
        The number of vectors added (all vectors of built or rebuilt layers).

    Raises:
        IndexCorruptError: an index to extend does not match its manifest.
    """
    if manifest_missing(con):
        con.execute("DELETE FROM store_meta WHERE key = 'schema_sha256'")
        ensure_schema(con)
    finish_interrupted(con, db_path)
    manifest, added = manifest_rows(con), 0
    scalars = relation(con)  # the states' keys, without opening a vector segment
    layers = con.execute(f"SELECT layer, count(*), max(id) FROM {scalars} GROUP BY layer ORDER BY layer").fetchall()
    build, extend = {}, {}
    for layer, n, max_id in layers:
        row = manifest.get(layer)
        if row is not None and (n, max_id) == (row["ntotal"], row["max_id"]):
            continue
        if row is not None and stats_problem(con, row):
            log.warning("Layer %d: the manifest's standardisation is damaged; rebuilding.", layer)
            row = None
        if row is not None:
            old = con.execute(f"SELECT count(*) FROM {scalars} WHERE layer = ? AND id <= ?", [layer, row["max_id"]])
            if old.fetchall()[0][0] != row["ntotal"]:
                log.warning("Layer %d: states at or below id %d changed since the index was built; rebuilding.",
                            layer, row["max_id"])
                row = None
        if row is None:
            build[int(layer)] = int(n)
        else:
            extend[int(layer)] = row
    added += sum(r["ntotal"] for r in build_layers(con, db_path, build, kind, threshold))
    folder = index_dir(Path(db_path))
    sizes = {layer: _size(folder / row["path"]) for layer, row in extend.items()}
    added += extend_layers(con, db_path, {layer: row["max_id"] for layer, row in extend.items()},
                           lambda layer: open_state_index(con, db_path, layer), sizes)
    return added


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def verify_indexes(con: duckdb.DuckDBPyConnection, db_path: Path) -> list[str]:
    """Check every state index against its manifest row and the states table (changes nothing).

    Returns:
        One line per problem (sha256 mismatch, missing file, leftover temp file, damaged standardisation,
        ntotal/max_id out of step, layer without index, no manifest table); empty when all is well.
    """
    folder, problems = index_dir(Path(db_path)), []
    counts = {r[0]: (r[1], r[2]) for r in
              con.execute(f"SELECT layer, count(*), max(id) FROM {relation(con)} GROUP BY layer").fetchall()}
    if manifest_missing(con):
        return [f"The store has no faiss_manifest table (dropped?): no index can be trusted. {REBUILD}"]
    manifest = manifest_rows(con)
    for layer, row in manifest.items():
        if problem := file_problem(folder, row, roll_forward=False):
            problems.append(problem)
        if problem := stats_problem(con, row):
            problems.append(problem)
        n, max_id = counts.get(layer, (0, None))
        if n != row["ntotal"] or max_id != row["max_id"]:
            problems.append(f"Layer {layer}: the index holds {row['ntotal']} vectors up to id {row['max_id']}, the "
                            f"store {n} states up to id {max_id}; sync or rebuild the indexes.")
    problems += [f"Layer {layer}: {n} states but no index." for layer, (n, _) in sorted(counts.items())
                 if layer not in manifest]
    if folder.is_dir():
        problems += [f"Index file {tmp}: an interrupted build left it; any write command (or `geomap index "
                     f"rebuild`) finishes or removes it." for tmp in sorted(folder.glob("*.faiss.tmp"))
                     if not any(problem.startswith(f"Index file {folder / tmp.name.removesuffix('.tmp')}:")
                                for problem in problems)]
    return problems


def open_state_index(con: duckdb.DuckDBPyConnection, db_path: Path, layer: int) -> StateIndex:
    """Load one layer's state index after checking its sha256 against the manifest.

    Raises:
        StoreError: the layer has no index.
        IndexCorruptError: the file is missing, truncated or altered (an interrupted rename is finished instead).
    """
    folder = index_dir(Path(db_path))
    if manifest_missing(con):
        raise IndexCorruptError(f"The store has no faiss_manifest table: no index can be trusted. {REBUILD}")
    row = manifest_rows(con).get(layer)
    if row is None:
        raise StoreError(f"Layer {layer} has no state index in {folder}. {REBUILD}")
    if problem := file_problem(folder, row, roll_forward=True) or stats_problem(con, row):
        raise IndexCorruptError(problem)
    path = folder / row["path"]
    index = faiss.read_index(str(path))
    if index.d != row["dim"] or index.ntotal != row["ntotal"]:
        raise IndexCorruptError(f"Index file {path} holds {index.ntotal}×{index.d}, its manifest says "
                                f"{row['ntotal']}×{row['dim']}. {REBUILD}")
    mean, std = (np.asarray(row[c], dtype=np.float32) for c in ("mean", "std"))
    return StateIndex(layer, row["kind"].split(":")[-1], path, index, mean, std)

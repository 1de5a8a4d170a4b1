"""Building and extending the per-layer state indexes: one scan of the states serves many layers.

A layer's index is built in two passes over its states (`LayerBuild`): the first gathers the per-dimension mean and
std (a chunked Chan merge in float64) and, for IVF, a training sample; the second adds the standardised vectors
and, for IVF, keeps the exact neighbours of the calibration queries that choose ``nprobe``. The states are read by
`scan_layers`, which reads every vector of the layers it is asked for in one query and hands each layer its rows:
in a segments store a vector column is decompressed page by page, and a page holds every layer of its positions,
so reading the layers one by one would decompress every page once per layer (19 times for Gemma-3-270M).

How many layers share a scan is bounded by memory (`BUILD_BYTES`: their training samples and indexes together),
so a large store is built in several scans and a small one in one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import faiss
import numpy as np

from geomap.store.codec import decode_bf16
from geomap.store.db import StoreError
from geomap.store.manifest import commit_index

log = logging.getLogger(__name__)

TARGET_RECALL = 0.97  # on the calibration sample; a margin over the 0.95 promised for any query
N_CALIBRATION = 256
CHUNK = 16_384  # rows of one scan batch
BUILD_BYTES = 256 << 20  # training samples and indexes of the layers built from one scan, at most about this


def ivf_lists(n: int) -> int:
    """IVF lists for ``n`` vectors: 4·sqrt(n), at most n/39 and 4096."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39, 4096))


def new_index(kind: str, d: int, nlist: int) -> faiss.Index:
    """An empty index of ``kind`` (``ivf``, ``flat`` or ``hnsw``) over inner products."""
    if kind == "ivf":
        return faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                             faiss.METRIC_INNER_PRODUCT)
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    inner = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)  # no add_with_ids of its own
    inner.hnsw.efConstruction, inner.hnsw.efSearch = 80, 64
    return faiss.IndexIDMap2(inner)


def standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std``, L2-normalised, as float32 (what a state index holds and searches with)."""
    z = np.ascontiguousarray((np.asarray(x, dtype=np.float32) - mean) / std, dtype=np.float32)
    faiss.normalize_L2(z)
    return z


def train_coarse(index: faiss.IndexIVF, train: np.ndarray) -> None:
    """Train an IVF index's coarse quantizer (k-means) on ``train``, as ``index.train`` does, without its copy.

    ``IndexIVF.train`` also trains the encoder on residuals, which it computes into a copy of the whole sample; a
    float16 scalar quantizer has nothing to train, so for it that copy is all the step does. Other encoders train
    as usual.
    """
    if not (isinstance(index, faiss.IndexIVFScalarQuantizer) and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16):
        index.train(train)
        return
    index.train_q1(len(train), faiss.swig_ptr(train), False, index.metric_type)
    index.is_trained = True


def choose_nprobe(index: faiss.IndexIVF, queries: np.ndarray, qids: np.ndarray, truth: np.ndarray) -> float:
    """Set the smallest nprobe of 1, 2, 3, 4, 6, 8, 12, … with recall@10 ≥ TARGET_RECALL (self excluded).

    Returns:
        The recall reached on the calibration queries.
    """
    k = min(10, index.ntotal - 1)
    if k < 1:
        return 1.0
    want = [set([i for i in row if i != q][:k]) for row, q in zip(truth, qids)]
    steps = sorted({min(m * 2**e, index.nlist) for e in range(32) for m in (2, 3) if m * 2**e <= 2 * index.nlist})
    for nprobe in [1, *steps]:  # powers of two and the halfway points between them
        index.nprobe = nprobe
        found = index.search(queries, k + 1)[1].tolist()
        recall = float(np.mean([len(w & set(f)) / k for w, f in zip(want, found)]))
        if recall >= TARGET_RECALL or nprobe == index.nlist:
            return recall
    return recall


def vector_width(con: duckdb.DuckDBPyConnection) -> int:
    """The width of the states' vectors (``vec FLOAT[d]``)."""
    rows = con.execute("SELECT data_type FROM duckdb_columns() WHERE table_name = 'states' AND column_name = 'vec' "
                       "AND database_name = current_database() AND schema_name = 'main'").fetchall()
    try:
        return int(rows[0][0].rsplit("[", 1)[1].rstrip("]"))
    except (IndexError, ValueError):
        return 4096  # an estimate is enough: it only sizes the scans


def scan_layers(con: duckdb.DuckDBPyConnection, after: dict[int, int]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(layer, ids, vectors)`` for the states of each layer in ``after`` with id > its value, bf16 decoded.

    One query reads them all, in whatever order DuckDB's parallel scan gives: what is built from them must not
    depend on it (`LayerBuild` draws its sample by id, and sorts it).
    """
    if not after:
        return
    listed = ", ".join(str(int(layer)) for layer in sorted(after))  # integers: a literal list is pushed into the scan
    query = f"SELECT id, layer, vec, vec_bf16 FROM states WHERE layer IN ({listed}) AND id > $after"  # noqa: S608
    # The reader is drained or closed before the connection runs anything else (DuckDB refuses otherwise).
    reader = con.sql(query, params={"after": min(after.values())}).to_arrow_reader(CHUNK)
    try:
        for batch in reader:
            ids = batch.column(0).to_numpy().astype(np.int64)
            layers = batch.column(1).to_numpy()
            out = _vectors(batch, ids)
            for layer in np.unique(layers):
                keep = (layers == layer) & (ids > after[int(layer)])
                if keep.any():
                    yield int(layer), ids[keep], out[keep]
    finally:
        reader.close()


def _vectors(batch, ids: np.ndarray) -> np.ndarray:
    """(n, d) float32 vectors of a scan batch: ``vec``, or ``vec_bf16`` decoded where ``vec`` is null."""
    vec = batch.column(2)
    d = vec.type.list_size
    out = np.empty((len(ids), d), dtype=np.float32)
    null = np.asarray(vec.is_null(), dtype=bool)
    out[~null] = vec.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
    if null.any():
        blobs = batch.column(3).filter(vec.is_null()).to_pylist()
        for state_id, blob in zip(ids[null], blobs):
            if blob is None or len(blob) != 2 * d:
                raise StoreError(f"State {state_id} has no vec and no {2 * d}-byte vec_bf16.")
        out[null] = decode_bf16(np.frombuffer(b"".join(blobs), dtype="<u2").reshape(-1, d))
    return out


def _draw(ids: np.ndarray, layer: int) -> np.ndarray:
    """A uniform number in [0, 1) for each state id, fixed by the id and the layer (splitmix64 of both)."""
    z = ids.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (layer + 1)) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


class LayerBuild:
    """One layer's index being built: `observe` every vector (pass 1), `start`, `add` every vector (pass 2), `finish`.

    Args:
        layer: The layer.
        n: Its number of states.
        kind: ``auto`` (flat below ``threshold``, else IVF), ``flat``, ``ivf`` or ``hnsw``.
        threshold: Vectors from which ``auto`` picks IVF.
    """

    def __init__(self, layer: int, n: int, kind: str, threshold: int):
        if kind not in ("auto", "flat", "ivf", "hnsw"):
            raise ValueError(f"Unknown index kind {kind!r}; use 'auto', 'flat', 'ivf' or 'hnsw'.")
        self.layer, self.n = layer, n
        self.kind = kind if kind != "auto" else ("flat" if n < threshold else "ivf")
        self.nlist = ivf_lists(n) if self.kind == "ivf" else 0
        self.n_train = min(n, 50 * self.nlist)
        self.rng = np.random.default_rng(layer)
        self.seen, self.mean, self.m2 = 0, None, None
        self.sample: list[np.ndarray] = []
        self.sample_ids: list[np.ndarray] = []
        self.max_id = -1
        self.index = self.queries = self.qids = self.truth_s = self.truth_i = None

    def bytes_needed(self, d: int) -> int:
        """About the memory this build holds at its peak: the training sample and the index."""
        per_vector = {"ivf": 2 * d + 8, "flat": 4 * d + 8}.get(self.kind, 4 * d + 8 + 32 * 8 * 2)
        return self.n_train * 4 * d + self.n * per_vector

    def observe(self, ids: np.ndarray, x: np.ndarray) -> None:
        """Pass 1: merge a chunk into the mean and std, and draw its share of the training sample."""
        x64 = x.astype(np.float64)
        c_mean = x64.mean(0)
        c_m2 = ((x64 - c_mean) ** 2).sum(0)
        if self.mean is None:
            self.mean, self.m2 = np.zeros_like(c_mean), np.zeros_like(c_mean)
        delta, total = c_mean - self.mean, self.seen + len(ids)
        self.mean = self.mean + delta * len(ids) / total
        self.m2 = self.m2 + c_m2 + delta**2 * self.seen * len(ids) / total
        self.seen = total
        if self.n_train:
            pick = _draw(ids, self.layer) < self.n_train / self.n
            self.sample.append(x[pick])
            self.sample_ids.append(ids[pick])

    def start(self) -> None:
        """Between the passes: freeze the standardisation, make the index, train an IVF and pick its queries."""
        std = np.sqrt(self.m2 / max(self.seen - 1, 1))
        self.std = np.where(std > 1e-6 * max(float(std.max()), 1e-30), std, 1.0).astype(np.float32)
        self.mean = self.mean.astype(np.float32)
        self.index = new_index(self.kind, len(self.mean), self.nlist)
        if self.kind == "ivf":
            ids, train = self._sample_by_id(len(self.mean))
            train -= self.mean  # in place: `standardise` without its two temporary copies of the sample
            train /= self.std
            faiss.normalize_L2(train)
            train_coarse(self.index, train)
            pick = self.rng.permutation(len(train))[:N_CALIBRATION]
            self.queries, self.qids = train[pick], ids[pick]
            self.truth_s = np.full((len(self.queries), 0), -np.inf, dtype=np.float32)
            self.truth_i = np.zeros((len(self.queries), 0), dtype=np.int64)
        self.sample, self.sample_ids = [], []

    def _sample_by_id(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """The training sample's ids and vectors in id order (the same set in the same order, however it was read).

        Each chunk is copied to its sorted rows and let go, so the sample is held about once, not three times (the
        chunks, their concatenation and its sorted copy).
        """
        ids = np.concatenate(self.sample_ids)
        order = np.argsort(ids, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        train = np.empty((len(ids), d), dtype=np.float32)
        start = 0
        self.sample.reverse()  # popped from the end: the first chunk first
        while self.sample:
            chunk = self.sample.pop()
            train[rank[start:start + len(chunk)]] = chunk
            start += len(chunk)
        return ids[order], train

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        """Pass 2: add a chunk's standardised vectors; for IVF keep the exact top 11 of the calibration queries."""
        z = standardise(x, self.mean, self.std)
        self.index.add_with_ids(z, ids)
        self.max_id = max(self.max_id, int(ids.max()))
        if self.queries is not None:
            sims = np.concatenate([self.truth_s, self.queries @ z.T], axis=1)
            cand = np.concatenate([self.truth_i, np.broadcast_to(ids, (len(self.queries), len(ids)))], axis=1)
            keep = np.argpartition(-sims, min(10, sims.shape[1] - 1), axis=1)[:, :11]  # running exact top-11
            self.truth_s, self.truth_i = np.take_along_axis(sims, keep, 1), np.take_along_axis(cand, keep, 1)

    def finish(self, con: duckdb.DuckDBPyConnection, db_path: Path) -> dict:
        """Choose an IVF's nprobe, then write the index and commit its manifest row; the row."""
        if self.queries is not None:
            truth = np.take_along_axis(self.truth_i, np.argsort(-self.truth_s, axis=1), 1)
            recall = choose_nprobe(self.index, self.queries, self.qids, truth.tolist())
            log.info(
                "Layer %d: IVF n=%d nlist=%d nprobe=%d recall@10=%.3f", self.layer, self.n, self.nlist,
                self.index.nprobe, recall)
        return commit_index(con, db_path, self.layer, self.index, self.kind, self.mean, self.std, self.max_id)


def in_groups(sizes: dict[int, int], budget: int = BUILD_BYTES) -> list[list[int]]:
    """Layers in order, cut into groups whose sizes add up to at most ``budget`` (a larger layer goes alone)."""
    groups: list[list[int]] = []
    total = 0
    for layer in sorted(sizes):
        if groups and total + sizes[layer] <= budget:
            groups[-1].append(layer)
            total += sizes[layer]
        else:
            groups.append([layer])
            total = sizes[layer]
    return groups


def build_layers(con: duckdb.DuckDBPyConnection, db_path: Path, counts: dict[int, int], kind: str,
                 threshold: int) -> list[dict]:
    """Build the index of every layer in ``counts`` (layer → states), two scans per group of layers.

    Returns:
        The manifest rows written, in layer order.
    """
    if kind not in ("auto", "flat", "ivf", "hnsw"):
        raise ValueError(f"Unknown index kind {kind!r}; use 'auto', 'flat', 'ivf' or 'hnsw'.")
    builds = {layer: LayerBuild(layer, n, kind, threshold) for layer, n in counts.items() if n}
    d = vector_width(con)
    rows = []
    for group in in_groups({layer: b.bytes_needed(d) for layer, b in builds.items()}):
        after = {layer: -(2**63) for layer in group}
        for layer, ids, x in scan_layers(con, after):
            builds[layer].observe(ids, x)
        for layer in group:
            builds[layer].start()
        for layer, ids, x in scan_layers(con, after):
            builds[layer].add(ids, x)
        rows += [builds.pop(layer).finish(con, db_path) for layer in group]
    return rows


def extend_layers(con: duckdb.DuckDBPyConnection, db_path: Path, after: dict[int, int],
                  open_index: Callable, sizes: dict[int, int]) -> int:
    """Append each layer's states with id > ``after[layer]`` to its open index, one scan per group of layers.

    Args:
        con: The store's writing connection.
        db_path: Its DuckDB file.
        after: Layer → the largest id its index holds.
        open_index: Layer → its checked, open index (``vectors.open_state_index``: ``index``, ``prepare``, ``kind``,
            ``mean``, ``std``).
        sizes: Layer → bytes its index holds (what opening it costs in memory).

    Returns:
        The vectors added.
    """
    added = 0
    for group in in_groups(sizes):
        opened = {layer: open_index(layer) for layer in group}
        last = {layer: after[layer] for layer in group}
        for layer, ids, x in scan_layers(con, last):
            opened[layer].index.add_with_ids(opened[layer].prepare(x), ids)
            added, last[layer] = added + len(ids), max(last[layer], int(ids.max()))
        for layer in group:
            state = opened.pop(layer)
            commit_index(con, db_path, layer, state.index, state.kind, state.mean, state.std, last[layer])
    return added


"""Exact inner-product FAISS indexes over a model's vocabulary matrices, cached once per model."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

from geomap.digest import sha256_of
from geomap.lru import Lru
from geomap.store.files import publish, write_temp

log = logging.getLogger(__name__)
_OPEN: Lru[tuple[tuple, faiss.Index]] = Lru(4)  # bounded: the indexes this process read, key → (file signature, index)


def vocab_index(matrix: np.ndarray, weights_hash: str, which: str, folder: Path, tied: bool = False) -> faiss.Index:
    """Exact inner-product index over a vocabulary matrix's rows, cached once per model.

    No normalisation: a score is the logit without bias. Exact on purpose: HNSW is no usable shortcut for inner
    product over a 262k vocabulary (top-10 overlap 0.28 measured). The cache file,
    ``<folder>/<weights_hash[:16]>-<which>.faiss``, is written atomically with a ``.sha256`` sidecar; a
    file that fails the check is rebuilt (it derives from the weights) with a warning.

    Args:
        matrix: (V, d) float32 rows (embedding or unembedding).
        weights_hash: sha256 of the model's weights.
        which: 'embed' or 'unembed'.
        folder: Where the cache files live (the caller's per-machine cache; the store knows no models).
        tied: embedding and unembedding are the same matrix; both then share the 'unembed' file.

    Returns:
        An ``IndexFlatIP`` holding the V rows (ids = token ids).
    """
    which = "unembed" if tied else which
    key = (weights_hash, which, tuple(matrix.shape))
    path = Path(folder) / f"{weights_hash[:16]}-{which}.faiss"
    cached = _OPEN.get(key)
    if cached is not None and cached[0] == _signature(path):  # same file as checked before: skip the sha256
        return cached[1]
    index = _load_or_build(matrix, path)
    _OPEN.put(key, (_signature(path), index))
    return index


def _signature(path) -> tuple:
    """(path, size, mtime) of a file, or None when it is missing."""
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path), st.st_size, st.st_mtime_ns)


def _load_or_build(matrix: np.ndarray, path: Path) -> faiss.Index:
    x = np.ascontiguousarray(matrix, dtype=np.float32)
    sidecar = path.with_name(path.name + ".sha256")
    if path.exists():
        expected = sidecar.read_text().strip() if sidecar.exists() else None
        if expected == sha256_of(path):
            index = faiss.read_index(str(path))
            if (index.ntotal, index.d) == x.shape:
                return index
            log.warning("Vocabulary index %s holds %d×%d, not %s; rebuilding it.", path, index.ntotal, index.d, x.shape)
        else:
            log.warning("Vocabulary index %s fails its sha256 check; rebuilding it from the weights.", path)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    digest = write_temp(tmp, index)
    publish(tmp, path)
    tmp = sidecar.with_name(sidecar.name + ".tmp")  # a crash before this rename: the next call rebuilds, warning
    write_temp(tmp, f"{digest}\n".encode())
    publish(tmp, sidecar)
    return index

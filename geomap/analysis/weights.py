"""Read a model's weight slice beside the store (`geomap.models.weights_slice`): numpy only, memory-mapped.

What a report needs from the weights, without loading the model: the final norm, unembedding rows and their
norms, the embedding's nearest rows, a neuron's output direction read through the unembedding, the rotary
frequencies and the architecture's facts. Arithmetic follows `geomap.models.registry.Anatomy` (same norms, same
frozen-norm rule), in float32 / float64 numpy.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geomap.store.db import StoreError


def slice_folder(db_path: str | Path, weights_sha256: str) -> Path:
    """Where a store keeps the weight slice of one model (the same rule as the writer's)."""
    return Path(f"{db_path}.weights") / weights_sha256[:16]


@dataclass
class Weights:
    """One model's weight slice. Arrays are read on first use, memory-mapped.

    Attributes:
        folder: The slice's folder.
        meta: Its ``meta.json``: sizes, norm kind and eps, the layer's parameter shapes, the architecture's facts.
    """

    folder: Path
    meta: dict
    _arrays: dict = field(default_factory=dict, repr=False)

    @property
    def weights_hash(self) -> str:
        """sha256 of the model's weights."""
        return self.meta["weights_sha256"]

    def array(self, name: str) -> np.ndarray | None:
        """A stored array (None when the model has no such part)."""
        if name not in self._arrays:
            path = self.folder / f"{name}.npy"
            self._arrays[name] = np.load(path, mmap_mode="r") if path.exists() else None
        return self._arrays[name]

    @property
    def unembed(self) -> np.ndarray:
        """(V, d) unembedding rows."""
        return self.array("unembed")

    @property
    def embed(self) -> np.ndarray:
        """(V, d) embedding rows (the unembedding's when tied), before the model's embedding scale."""
        return self.unembed if self.meta["tied"] else self.array("embed")

    def unembed_rows(self, ids) -> np.ndarray:
        """(n, d) float32 rows of the given token ids."""
        ids = np.asarray(list(ids), np.int64)
        return np.asarray(self.unembed[ids], np.float32)

    def _norm_weight(self) -> np.ndarray:
        w = np.asarray(self.array("final_norm"), np.float32)
        return 1.0 + w if self.meta["norm_kind"] == "rms_plus_one" else w

    def normed(self, x: np.ndarray) -> np.ndarray:
        """States (n, d) or (d,) after the model's final norm, as the unembedding reads them."""
        x = np.asarray(x, np.float32)
        return self.frozen(x, self.norm_scale(x)) + self._norm_bias()

    def norm_scale(self, x: np.ndarray) -> np.ndarray:
        """The final norm's factor for each state: 1/rms, or 1/std for LayerNorm."""
        x = np.asarray(x, np.float32)
        eps = np.float32(self.meta["final_norm_eps"])
        if self.meta["norm_kind"] == "layer":
            return (1.0 / np.sqrt(x.var(-1) + eps)).astype(np.float32)
        return (1.0 / np.sqrt(np.mean(x * x, -1) + eps)).astype(np.float32)

    def frozen(self, x: np.ndarray, scale) -> np.ndarray:
        """The final norm with its scale frozen at ``scale``: linear in ``x``, without a LayerNorm bias."""
        x = np.asarray(x, np.float32)
        if self.meta["norm_kind"] == "layer":
            x = x - x.mean(-1, keepdims=True)
        return x * np.asarray(scale, np.float32)[..., None] * self._norm_weight()

    def _norm_bias(self) -> np.ndarray | float:
        b = self.array("final_norm_bias")
        return 0.0 if b is None else np.asarray(b, np.float32)

    def row_norms(self) -> np.ndarray:
        """(V,) the embedding rows' norms (computed once, kept beside the slice)."""
        path = self.folder / "embed_norms.npy"
        if path.exists():
            return np.load(path)
        norms = np.linalg.norm(np.asarray(self.embed, np.float32), axis=1).astype(np.float32)
        try:
            tmp = path.with_name("embed_norms.tmp.npy")
            np.save(tmp, norms)
            tmp.replace(path)
        except OSError:  # a read-only store: computed each time
            pass
        return norms

    def neuron_directions(self, picks: list[tuple[int, int]]) -> np.ndarray:
        """(n, d) float32: each (layer, neuron)'s output direction as the unembedding reads it.

        Its column of W_down, through the post-MLP norm's weight where the model has one and the final norm's
        weight; the norms' 1/rms factors are positive scalars that do not change the order of tokens.
        """
        if not picks:
            return np.zeros((0, self.meta["d_model"]), np.float32)
        down, plus_one = self.array("down"), self.meta["norm_kind"] == "rms_plus_one"
        out_norm = self.array("mlp_out_norm")
        cols = []
        for layer, neuron in picks:
            col = np.asarray(down[layer][:, neuron], np.float32)
            if out_norm is not None:
                w = np.asarray(out_norm[layer], np.float32)
                col = col * ((1.0 + w) if plus_one else w)
            cols.append(col)
        x = np.stack(cols)
        if self.meta["norm_kind"] == "layer":
            x = x - x.mean(1, keepdims=True)
        return (x * self._norm_weight()).astype(np.float32)

    def neuron_logits(self, picks: list[tuple[int, int]]) -> np.ndarray:
        """(n, V) each (layer, neuron)'s output direction read through W_U (`neuron_directions` · W_Uᵀ)."""
        if not picks:
            return np.zeros((0, self.meta["vocab_size"]), np.float32)
        return self.neuron_directions(picks) @ np.asarray(self.unembed).T

    def rope(self, layer: int) -> tuple[str, np.ndarray, float, float] | None:
        """``(name, inv_freq, attention_scaling, score scaling)`` of a layer's rotation, or None without RoPE."""
        rope = self.meta["architecture"]["ropes"][layer]
        if rope is None:
            return None
        return (rope["name"], np.asarray(self.array(f"rope_{rope['name']}"), np.float64),
                float(rope["attention_scaling"]), float(rope["scaling"]))


@functools.lru_cache(maxsize=8)
def _open(folder: str, mtime: int) -> Weights:
    meta = json.loads((Path(folder) / "meta.json").read_text(encoding="utf-8"))
    return Weights(Path(folder), meta)


def weights_for(db_path: str | Path, weights_sha256: str) -> Weights:
    """The weight slice of a model beside the store, or a `StoreError` saying how to write it."""
    folder = slice_folder(db_path, weights_sha256)
    meta = folder / "meta.json"
    if not meta.exists():
        raise StoreError(f"The store has no weight slice for model {weights_sha256[:12]} ({folder}); write it with "
                         "`geomap report journey` (it loads the model once) or rerun the ingestion.")
    return _open(str(folder), meta.stat().st_mtime_ns)


def has_weights(db_path: str | Path, weights_sha256: str) -> bool:
    """Whether the store holds this model's weight slice."""
    return (slice_folder(db_path, weights_sha256) / "meta.json").exists()

"""What one intervention is, as data: a frozen, content-hashed spec the ledger keys on.

Operations:
    ``patch``: set a site of ``prompt``'s run to its value in ``source``'s run.
    ``ablate``: set a site to zero (``ablation="zero"``), to the mean of the site over a prompt set (``"mean"``,
        ``vector`` holds the mean) or to its value in another prompt's run (``"resample"``, ``source``).
    ``steer``: add ``coefficient`` · ``vector`` to a site.
    ``trace``: restore a site of a corrupted run to its clean value. With ``noise`` the corrupted run is ``prompt``
        with noise on the embeddings of the subject's positions and the clean value comes from ``prompt`` itself;
        with ``source`` the corrupted run is ``prompt`` and the clean value comes from ``source``.

Positions count from the start of ``prompt``; negative ones from its end. A source's positions are aligned from the
end (the last token with the last token) unless ``source_positions`` names them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from geomap.intervene.sites import InterventionError, Site

OPERATIONS = ("patch", "ablate", "steer", "trace")
ABLATIONS = ("zero", "mean", "resample")


@dataclass(frozen=True)
class Noise:
    """Gaussian noise on the token embeddings at ``positions``: ``scale`` × the embedding's std, seeded."""

    positions: tuple[int, ...]
    scale: float = 3.0
    seed: int = 0


@dataclass(frozen=True)
class Spec:
    """One intervention on one prompt's run (see the module docstring for the operations)."""

    operation: str
    prompt: str
    site: Site
    positions: tuple[int, ...]
    source: str | None = None
    source_positions: tuple[int, ...] | None = None
    ablation: str | None = None
    vector: bytes | None = None
    vector_label: str | None = None
    coefficient: float = 0.0
    noise: Noise | None = None
    window: int = 1

    def __post_init__(self):
        if self.operation not in OPERATIONS:
            raise InterventionError(f"operation {self.operation!r} is not one of {', '.join(OPERATIONS)}")
        if not self.positions:
            raise InterventionError("an intervention needs at least one position")
        if self.operation == "ablate" and self.ablation not in ABLATIONS:
            raise InterventionError(f"ablation {self.ablation!r} is not one of {', '.join(ABLATIONS)}")
        needs_source = self.operation == "patch" or (self.operation == "ablate" and self.ablation == "resample")
        if needs_source and self.source is None:
            raise InterventionError(f"{self.operation} needs a source prompt")
        if self.operation == "trace" and (self.noise is None) == (self.source is None):
            raise InterventionError("a trace corrupts the run with noise or with a second prompt (one of them)")
        if (self.operation == "steer" or self.ablation == "mean") and self.vector is None:
            raise InterventionError(f"{self.operation} needs a vector")
        if self.source_positions is not None and len(self.source_positions) != len(self.positions):
            raise InterventionError("source positions must pair one to one with the positions")
        if self.window < 1:
            raise InterventionError("a window is at least one layer")

    # --- identity ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON-ready form; a vector appears as its label and sha256."""
        out = {"operation": self.operation, "prompt": self.prompt,
               "site": {"kind": self.site.kind, "layer": self.site.layer, "head": self.site.head},
               "positions": list(self.positions), "source": self.source,
               "source_positions": None if self.source_positions is None else list(self.source_positions),
               "ablation": self.ablation, "coefficient": float(self.coefficient), "window": self.window,
               "vector": None if self.vector is None else {"label": self.vector_label,
                                                           "sha256": hashlib.sha256(self.vector).hexdigest()},
               "noise": None if self.noise is None else {"positions": list(self.noise.positions),
                                                         "scale": float(self.noise.scale),
                                                         "seed": int(self.noise.seed)}}
        return out

    def key(self, model_identity: str) -> str:
        """Content hash of the spec under a model: equal specs are one ledger row."""
        text = json.dumps([model_identity, self.to_dict()], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def vector_array(self) -> np.ndarray | None:
        """The vector as float32, or None."""
        return None if self.vector is None else np.frombuffer(self.vector, dtype=np.float32)

    @property
    def seed(self) -> int | None:
        """The noise seed of a noisy trace."""
        return None if self.noise is None else self.noise.seed

    # --- sites ---------------------------------------------------------------------------------
    def sites(self, n_layers: int) -> list[Site]:
        """The sites this spec edits (a window spans layers around ``site.layer`` for attn/mlp traces)."""
        if self.window == 1 or self.site.kind not in ("attn", "mlp"):
            return [self.site]
        lo = max(0, self.site.layer - self.window // 2)
        hi = min(n_layers, self.site.layer - (-self.window // 2))
        return [Site(self.site.kind, layer, self.site.head) for layer in range(lo, hi)]


def vector_bytes(vector: np.ndarray) -> bytes:
    """A direction or mean as the bytes a `Spec` holds (float32, C order)."""
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def resolve(positions: tuple[int, ...], length: int, what: str = "position") -> list[int]:
    """Positions with negatives counted from the end; raise `InterventionError` outside 0..length-1."""
    out = []
    for p in positions:
        q = p + length if p < 0 else p
        if not 0 <= q < length:
            raise InterventionError(f"{what} {p} is outside the prompt's {length} tokens")
        out.append(q)
    return out


def aligned(spec: Spec, target_len: int, source_len: int) -> tuple[list[int], list[int]]:
    """Target positions and the source positions they take values from (from the end unless explicit)."""
    target = resolve(spec.positions, target_len)
    if spec.source_positions is not None:
        return target, resolve(spec.source_positions, source_len, "source position")
    source = [p - target_len + source_len for p in target]
    if min(source) < 0:
        raise InterventionError("aligned from the end, a position falls before the source prompt's start; "
                                "give source positions")
    return target, source

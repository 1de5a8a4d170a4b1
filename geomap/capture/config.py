"""What one capture records: positions, layers, top-k sizes and the overflow policy.

`CaptureConfig` is declared once, here. Its annotations carry the constraints that the validation layer
(`geomap.ingest.schema`) checks a pipeline's ``[capture]`` table, a CLI option or an HTTP body against (whole
numbers only, no ``"50"`` for 50; lists of positions; unknown keys refused); `__post_init__` checks the same
values for code that builds a config directly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import numpy as np
from annotated_types import Ge
from pydantic import ConfigDict, StrictInt

Positions = Literal["last", "all"] | tuple[StrictInt, ...]
PROFILES = ("full", "states")


@dataclass(frozen=True)
class CaptureConfig:
    """Options of a capture; its canonical JSON is part of every stored prompt's key.

    Attributes:
        attn_positions: Query positions whose attention internals (q, k, v, scores, weights, head
            outputs, head shares) and MLP features are kept: ``"last"``, ``"all"`` or explicit indices
            (negative counts from the end).
        lens_positions: Positions the logit lens reads, same forms.
        layers: Residual boundaries (0..L) read by the lens and decoder layers (0..L-1) whose attention
            internals are kept; ``None`` (or ``"all"``, stored as None) means all.
        top_k: Candidates kept per lens readout and per final distribution.
        mlp_top: MLP neurons kept per layer and position, by magnitude.
        overflow: ``"error"`` for prompts longer than the context window (or than ``max_tokens``), or
            ``"truncate"`` to keep the last tokens (and the BOS token, if any).
        max_tokens: A token budget per prompt, BOS included (``None``: the context window). A longer prompt
            follows ``overflow``: refused, or cut to its last ``max_tokens`` tokens. Left out of the canonical
            JSON when unset, so keys stored before the budget existed stay the same.
        attn_base: Attention kernel the capture delegates to: ``"sdpa"`` (fast) or ``"eager"``.
        profile: What a capture keeps. ``"full"``: everything above. ``"states"``: the residual stream at every
            boundary and position and the final readout (the model's top-k, entropy and logsumexp at every
            position), nothing else: no attention internals, updates, norm scales, MLP neurons, lens, or
            full-vocabulary logits (decoding then works from the stored top-k).
    """

    __pydantic_config__ = ConfigDict(extra="forbid")  # unknown keys refused; each field strict by its type

    attn_positions: Positions = "last"
    lens_positions: Positions = "last"
    layers: Literal["all"] | tuple[StrictInt, ...] | None = None
    top_k: Annotated[StrictInt, Ge(1)] = 50
    mlp_top: Annotated[StrictInt, Ge(1)] = 32
    overflow: Literal["error", "truncate"] = "error"
    max_tokens: Annotated[StrictInt, Ge(2)] | None = None
    attn_base: Literal["sdpa", "eager"] = "sdpa"
    profile: Literal["full", "states"] = "full"

    def __post_init__(self):
        for name in ("attn_positions", "lens_positions"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(int(v) for v in value))
            elif not isinstance(value, tuple) and value not in ("last", "all"):
                raise ValueError(f"{name} must be 'last', 'all' or a list of positions, not {value!r}")
        if self.layers == "all":
            object.__setattr__(self, "layers", None)
        elif isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(int(v) for v in self.layers))
        if self.top_k < 1 or self.mlp_top < 1:
            raise ValueError("top_k and mlp_top must be at least 1")
        if self.overflow not in ("error", "truncate"):
            raise ValueError(f"overflow must be 'error' or 'truncate', not {self.overflow!r}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 (BOS and one token), not {self.max_tokens!r}")
        if self.attn_base not in ("sdpa", "eager"):
            raise ValueError(f"attn_base must be 'sdpa' or 'eager', not {self.attn_base!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, not {self.profile!r}")

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal configs give equal strings.

        The default profile and an unset token budget are left out, so the keys of prompts stored before either
        existed stay the same.
        """
        fields = asdict(self)
        if fields["profile"] == "full":
            del fields["profile"]
        if fields["max_tokens"] is None:
            del fields["max_tokens"]
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def resolve_positions(selector: Positions, length: int) -> np.ndarray:
    """Turn a position selector into sorted unique indices for a prompt of ``length`` tokens."""
    if selector == "last":
        return np.array([length - 1], dtype=np.int64)
    if selector == "all":
        return np.arange(length, dtype=np.int64)
    idx = np.array([p + length if p < 0 else p for p in selector], dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= length):
        raise ValueError(f"positions {list(selector)} fall outside a prompt of {length} tokens")
    return np.unique(idx)


def resolve_layers(layers: tuple[int, ...] | None, n_layers: int) -> np.ndarray:
    """Residual boundaries selected by ``layers`` (0..n_layers), sorted; negative counts from the end."""
    if layers is None:
        return np.arange(n_layers + 1, dtype=np.int64)
    idx = np.array([ell + n_layers + 1 if ell < 0 else ell for ell in layers], dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() > n_layers):
        raise ValueError(f"layers {list(layers)} fall outside 0..{n_layers}")
    return np.unique(idx)

"""The capture stage's output: frozen dataclasses of numpy arrays with documented shapes.

Symbols in shapes: T tokens, L decoder layers (residual boundaries 0..L), d residual width, H query heads,
G key/value heads, Dh head width, V vocabulary, Q captured query positions, La captured decoder layers,
Ll lens boundaries, P lens positions, k top-k, M MLP neurons kept. All floats are float32.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


def _check(obj, shapes: dict[str, tuple]) -> None:
    """Check that each named array has the given shape; ``None`` matches any size."""
    for name, expected in shapes.items():
        actual = getattr(obj, name).shape
        if len(actual) != len(expected) or any(e is not None and a != e for a, e in zip(actual, expected)):
            raise ValueError(f"{type(obj).__name__}.{name} has shape {actual}, expected {expected}")


@dataclass(frozen=True)
class Tokens:
    """The prompt as the model sees it. Position 0 is BOS when the tokenizer adds one."""

    ids: np.ndarray
    """(T,) int64 token ids."""
    texts: tuple[str, ...]
    """T display strings; bytes that are part of an unfinished UTF-8 character show as U+FFFD."""
    raw: tuple[bytes, ...]
    """T raw byte strings (special tokens: their literal text)."""
    special: np.ndarray
    """(T,) bool, True for special tokens such as BOS."""

    def __post_init__(self):
        n = len(self.ids)
        if len(self.texts) != n or len(self.raw) != n:
            raise ValueError("Tokens: ids, texts and raw must have one entry per position")
        _check(self, {"special": (n,)})

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Stream:
    """The residual stream and what each layer adds to it: ``resid[l] + attn[l] + mlp[l] == resid[l+1]``."""

    resid: np.ndarray
    """(L+1, T, d): 0 = embedding output (after any scaling), L = last block output before the final norm."""
    attn: np.ndarray
    """(L, T, d) attention part of each layer's update, read from the module's own output."""
    mlp: np.ndarray
    """(L, T, d) MLP part of each layer's update."""
    norm_scale: np.ndarray
    """(L, K, T) scalar each in-layer norm multiplied its input by (1/rms, or 1/std for LayerNorm)."""
    norm_names: tuple[str, ...]
    """K names of the in-layer norms, in execution order."""
    final_norm_scale: np.ndarray
    """(T,) scale of the final norm."""

    def __post_init__(self):
        n_layers, length, width = self.resid.shape[0] - 1, self.resid.shape[1], self.resid.shape[2]
        kept = n_layers if self.attn.shape[0] else 0  # the "states" profile keeps no updates or norm scales
        _check(self, {"attn": (kept, length, width), "mlp": (kept, length, width),
                      "norm_scale": (kept, len(self.norm_names), length), "final_norm_scale": (length,)})


@dataclass(frozen=True)
class AttentionInside:
    """Inside attention at the captured query positions, per captured decoder layer."""

    layers: np.ndarray
    """(La,) int64 decoder layers."""
    positions: np.ndarray
    """(Q,) int64 query positions."""
    scaling: np.ndarray
    """(La,) the factor q·k is multiplied by (1/sqrt(Dh) unless the model says otherwise)."""
    q: np.ndarray
    """(La, Q, H, Dh) post-RoPE queries."""
    k: np.ndarray
    """(La, T, G, Dh) post-RoPE keys at every position."""
    v: np.ndarray
    """(La, T, G, Dh) values at every position."""
    scores: np.ndarray
    """(La, H, Q, T) scaled scores q·k·scaling before the causal mask."""
    weights: np.ndarray
    """(La, H, Q, T) softmax(scores + mask): each row sums to 1 and is 0 on future keys."""
    head_out: np.ndarray
    """(La, Q, H, Dh) each head's weighted sum of values."""
    head_share: np.ndarray
    """(La, Q, H, d) each head's part of the attention update (through W_O and any post-norm, frozen)."""
    bias_share: np.ndarray
    """(La, Q, d) the W_O bias's part; head shares + bias share == Stream.attn at these positions."""

    def __post_init__(self):
        n, q, length = len(self.layers), len(self.positions), self.k.shape[1]
        heads, dh = self.q.shape[2], self.q.shape[3]
        _check(self, {"scaling": (n,), "q": (n, q, heads, dh), "v": self.k.shape,
                      "scores": (n, heads, q, length), "weights": (n, heads, q, length),
                      "head_out": (n, q, heads, dh), "head_share": (n, q, heads, None),
                      "bias_share": (n, q, self.head_share.shape[-1])})


@dataclass(frozen=True)
class MlpFeatures:
    """The MLP hidden activations (input of its down projection) with the largest magnitude."""

    index: np.ndarray
    """(La, Q, M) int64 neuron indices, largest |activation| first (same layers/positions as attention)."""
    value: np.ndarray
    """(La, Q, M) their signed activations."""

    def __post_init__(self):
        _check(self, {"value": self.index.shape})


@dataclass(frozen=True)
class Readout:
    """Top-k of one or more next-token distributions, plus entropy and logsumexp of the full one."""

    ids: np.ndarray
    """(..., k) int64 token ids, best first, ranked on raw logits."""
    logits: np.ndarray
    """(..., k) their logits."""
    probs: np.ndarray
    """(..., k) their probabilities under the full softmax."""
    entropy: np.ndarray
    """(...) entropy of the full distribution, in nats."""
    logsumexp: np.ndarray
    """(...) logsumexp of the full logits."""

    def __post_init__(self):
        _check(self, {"logits": self.ids.shape, "probs": self.ids.shape, "logsumexp": self.entropy.shape})


@dataclass(frozen=True)
class LensReadout:
    """The logit lens: the model's final norm + unembedding applied to intermediate residuals."""

    layers: np.ndarray
    """(Ll,) int64 residual boundaries read."""
    positions: np.ndarray
    """(P,) int64 positions read."""
    top: Readout
    """Readout with leading shape (Ll, P)."""
    kl_to_final: np.ndarray
    """(Ll, P) KL(lens ‖ final) in nats."""
    final_rank: np.ndarray
    """(Ll, P) int64 1-based rank, under the lens, of the final distribution's top-1 token."""
    final_prob: np.ndarray
    """(Ll, P) lens probability of the final top-1 token."""

    def __post_init__(self):
        shape = (len(self.layers), len(self.positions))
        _check(self, {"kl_to_final": shape, "final_rank": shape, "final_prob": shape})
        _check(self.top, {"entropy": shape})


@dataclass(frozen=True)
class Journey:
    """Everything one forward pass recorded for one prompt."""

    text: str
    model: str
    tokens: Tokens
    stream: Stream
    attention: AttentionInside
    mlp: MlpFeatures
    final: Readout
    """Readout with leading shape (T,): the model's next-token distribution at every position."""
    last_logits: np.ndarray
    """(V,) full-vocabulary logits at the last position."""
    lens: LensReadout
    truncated: bool = False
    """True when the prompt was cut to the context window."""
    profile: str = "full"
    """What was kept (`CaptureConfig.profile`): ``"states"`` journeys hold only tokens, the residual stream and the
    final readout; their attention, MLP and lens parts are empty, and their stream has no updates."""

    def __post_init__(self):
        length = len(self.tokens)
        if self.stream.resid.shape[1] != length or self.final.entropy.shape != (length,):
            raise ValueError("Journey: stream and final readout must cover every token")

    @property
    def n_layers(self) -> int:
        """Number of decoder layers L."""
        return self.stream.resid.shape[0] - 1

    def nbytes(self) -> int:
        """Total size of the arrays held."""
        total = 0
        for part in (self.stream, self.attention, self.mlp, self.final, self.lens, self.lens.top):
            total += sum(getattr(part, f.name).nbytes for f in fields(part)
                         if isinstance(getattr(part, f.name), np.ndarray))
        return total + self.last_logits.nbytes


@dataclass(frozen=True)
class PromptFailure:
    """A prompt of a batch that could not be captured; the others proceed."""

    index: int
    text: str
    reason: str

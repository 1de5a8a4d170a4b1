"""Hooks and a registered attention function that record one forward pass, without changing it.

The attention function (registered under the name ``"geomap"`` with transformers' `AttentionInterface`,
together with the eager mask builder under the same name in `AttentionMaskInterface`) delegates the
actual attention to ``sdpa`` or to the model module's own ``eager_attention_forward``, then reads the
selected query rows: post-RoPE q, every key and value, scaled scores before the mask, the softmax
weights and each head's output. Forward hooks read the residual stream, what each layer adds to it, the
norms' scales and the MLP's hidden activations. Everything is only active inside `Recorder`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType

import torch

from geomap.models.registry import Anatomy

ATTN_NAME = "geomap"
_ACTIVE: ContextVar[Recorder | None] = ContextVar("geomap_recorder", default=None)
_REGISTERED = False


def _register() -> None:
    """Register the attention function and its mask builder with transformers (once, on first use)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_NAME, geomap_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)
    _REGISTERED = True


def _base_attention(module: torch.nn.Module, base: str):
    if base == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def geomap_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention that delegates to the base kernel and lets an active `Recorder` read its inside."""
    recorder = _ACTIVE.get()
    base = _base_attention(module, recorder.base if recorder else "sdpa")
    out, weights = base(module, query, key, value, attention_mask, **kwargs)
    if recorder is not None:
        recorder.on_attention(module, query, key, value, attention_mask, kwargs.get("scaling"), out)
    return out, weights


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@dataclass(frozen=True)
class Recording:
    """What one recorded forward pass read, frozen when the `Recorder` block ends (device tensors).

    B is the batch, T the padded length, d the residual width, Q the query rows read per batch row (`Recorder`'s
    ``query_index``), H query heads, G key/value heads, Dh the head width, I the MLP width, k the kept neurons.
    Per-layer mappings hold the layers whose attention internals were asked for (``layers``).

    Attributes:
        resid: L+1 × (B, T, d) residual stream at each boundary (0: the embedding output).
        attn_add: L × (B, T, d) what each layer's attention adds to the stream.
        mlp_add: L × (B, T, d) what each layer's MLP adds.
        o_rows: {layer: (B, Q, d)} the attention output before the post-attention norm, at the query rows
            (post-norm architectures only).
        norm_scale: {(layer, k): (B, T)} the scale each of a layer's norms applied.
        final_scale: (B, T) the scale the final norm applied.
        q: {layer: (B, H, Q, Dh)} post-RoPE queries at the query rows.
        k, v: {layer: (B, G, T, Dh)} every key and value.
        scores: {layer: (B, H, Q, T)} scaled scores before the mask.
        weights: {layer: (B, H, Q, T)} softmax weights (float32).
        head_out: {layer: (B, Q, H, Dh)} each head's output at the query rows.
        scaling: {layer: the scores' scale}.
        mlp_index, mlp_value: {layer: (B, Q, k)} the largest MLP hidden activations by magnitude, and their values.
    """

    resid: tuple[torch.Tensor, ...]
    attn_add: tuple[torch.Tensor, ...]
    mlp_add: tuple[torch.Tensor, ...]
    o_rows: Mapping[int, torch.Tensor]
    norm_scale: Mapping[tuple[int, int], torch.Tensor]
    final_scale: torch.Tensor
    q: Mapping[int, torch.Tensor]
    k: Mapping[int, torch.Tensor]
    v: Mapping[int, torch.Tensor]
    scores: Mapping[int, torch.Tensor]
    weights: Mapping[int, torch.Tensor]
    head_out: Mapping[int, torch.Tensor]
    scaling: Mapping[int, float]
    mlp_index: Mapping[int, torch.Tensor]
    mlp_value: Mapping[int, torch.Tensor]


class Recorder:
    """Context manager that records one forward pass of a batch (right-padded).

    Args:
        anatomy: The model's registry view.
        query_index: (B, Q) long tensor of query positions to read per row (padded entries repeat a
            valid position; callers drop them).
        layers: Decoder layers whose attention internals and MLP features are read.
        mlp_top: MLP neurons to keep per layer and position.
        base: ``"sdpa"`` or ``"eager"``.

    When the block ends, `recording` holds what the pass read as a frozen `Recording`; the attributes it is built
    from are the recorder's own working state.
    """

    def __init__(self, anatomy: Anatomy, query_index: torch.Tensor, layers: list[int], mlp_top: int,
                 base: str = "sdpa"):
        self.anatomy, self.query_index, self.layers = anatomy, query_index, set(layers)
        self.mlp_top, self.base = mlp_top, base
        n = anatomy.n_layers
        self.resid: list[torch.Tensor | None] = [None] * (n + 1)
        self.attn_add: list[torch.Tensor | None] = [None] * n
        self.mlp_add: list[torch.Tensor | None] = [None] * n
        self.o_out: dict[int, torch.Tensor] = {}
        self.norm_scale: dict[tuple[int, int], torch.Tensor] = {}
        self.final_scale: torch.Tensor | None = None
        self.q, self.k, self.v, self.scores, self.weights, self.head_out = ({} for _ in range(6))
        self.scaling: dict[int, float] = {}
        self.mlp_index: dict[int, torch.Tensor] = {}
        self.mlp_value: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._token = None
        self._saved_impl: str | None = None
        self.recording: Recording | None = None

    # --- hook plumbing -----------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        _register()
        a = self.anatomy
        for i, layer in enumerate(a.layers):
            self._pre(layer, lambda x, i=i: self.resid.__setitem__(i, x))
            self._post(a.attn_add(i), lambda y, i=i: self.attn_add.__setitem__(i, y))
            self._post(a.mlp_add(i), lambda y, i=i: self.mlp_add.__setitem__(i, y))
            if a.post_attn_norm(i) is not None:
                self._post(a.attn(i), lambda y, i=i: self.o_out.__setitem__(i, y))
            for k, norm in enumerate(a.layer_norms(i)):
                self._pre(norm, lambda x, i=i, k=k, norm=norm: self.norm_scale.__setitem__(
                    (i, k), a.norm_scale(norm, x)))
            if i in self.layers:
                self._pre(a.mlp_down(i), lambda x, i=i: self._mlp_features(i, x))
        self._post(a.layers[-1], lambda y: self.resid.__setitem__(a.n_layers, y))
        self._pre(a.final_norm, lambda x: setattr(self, "final_scale", a.norm_scale(a.final_norm, x)))
        model = a.model
        self._saved_impl = model.config._attn_implementation
        model.set_attn_implementation(ATTN_NAME)
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        for handle in self._handles:
            handle.remove()
        self.anatomy.model.set_attn_implementation(self._saved_impl)
        if exc[0] is None:
            self.recording = self._freeze()

    def _freeze(self) -> Recording:
        """The pass's reads as a `Recording` (read-only mappings over this recorder's tensors)."""
        def frozen(d: dict) -> Mapping:
            return MappingProxyType(dict(d))

        return Recording(
            resid=tuple(self.resid), attn_add=tuple(self.attn_add), mlp_add=tuple(self.mlp_add),
            o_rows=frozen({layer: self._rows(o, 1) for layer, o in self.o_out.items() if layer in self.layers}),
            norm_scale=frozen(self.norm_scale), final_scale=self.final_scale, q=frozen(self.q), k=frozen(self.k),
            v=frozen(self.v), scores=frozen(self.scores), weights=frozen(self.weights),
            head_out=frozen(self.head_out), scaling=frozen(self.scaling), mlp_index=frozen(self.mlp_index),
            mlp_value=frozen(self.mlp_value))

    def _pre(self, module, fn) -> None:
        def hook(_module, args, kwargs):
            fn((args[0] if args else next(iter(kwargs.values()))).detach())

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _post(self, module, fn) -> None:
        self._handles.append(module.register_forward_hook(lambda _m, _a, out: fn(_first(out).detach())))

    # --- readers -------------------------------------------------------------------------------
    def _rows(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Gather the selected query positions of each batch row along ``dim`` (batch is dim 0)."""
        return x.gather(dim, _index_for(self.query_index, x, dim))

    def _mlp_features(self, layer: int, hidden: torch.Tensor) -> None:
        rows = self._rows(hidden, 1).float()  # (B, Q, I)
        top = rows.abs().topk(min(self.mlp_top, rows.shape[-1]), dim=-1)
        self.mlp_index[layer] = top.indices
        self.mlp_value[layer] = rows.gather(-1, top.indices)

    def on_attention(self, module, query, key, value, mask, scaling, out) -> None:
        """Read one attention call: query (B,H,T,Dh), key/value (B,G,T,Dh), out (B,T,H,Dh)."""
        layer = int(module.layer_idx)
        if layer not in self.layers:
            return
        heads, kv_heads = query.shape[1], key.shape[1]
        scaling = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
        q_sel = query.gather(2, _index_for(self.query_index, query, 2))  # (B, H, Q, Dh)
        keys = key.repeat_interleave(heads // kv_heads, dim=1) if heads != kv_heads else key
        scores = torch.matmul(q_sel, keys.transpose(-1, -2)) * scaling  # (B, H, Q, T)
        if mask is None:
            length = key.shape[2]
            future = torch.arange(length, device=key.device)[None, :] > self.query_index[:, :, None]
            mask_rows = torch.zeros_like(scores[:, :1]).masked_fill(future[:, None], float("-inf"))
        else:
            mask_rows = mask[:, :, :, : key.shape[2]].gather(2, _index_for(self.query_index, mask, 2))
        self.scaling[layer] = scaling
        self.q[layer] = q_sel
        self.k[layer], self.v[layer] = key, value
        self.scores[layer] = scores
        self.weights[layer] = torch.softmax(scores.float() + mask_rows.float(), dim=-1)
        self.head_out[layer] = self._rows(out, 1)  # (B, Q, H, Dh)


def _index_for(index: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Expand a (B, Q) index so that ``x.gather(dim, ...)`` picks those positions along ``dim``."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    expand = list(x.shape)
    expand[dim] = index.shape[1]
    return index.view(shape).expand(expand)

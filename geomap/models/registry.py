"""The one place that knows architecture quirks, keyed by ``config.model_type``.

Everything else in geomap asks an `Anatomy` for modules and numbers (final norm, unembedding, embedding
scale, head counts, where attention sits, what each layer adds to the residual) instead of poking at
model attributes itself. Adding an architecture means adding one `ArchSpec` here and a tiny-model test.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from geomap.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one architecture live, as dotted paths (from the CausalLM or from a layer).

    Attributes:
        layers: Path from the causal LM to the ``ModuleList`` of decoder layers.
        embed: Path to the token embedding (its output is already scaled where the model scales it).
        final_norm: Path to the norm applied after the last layer.
        unembed: Path to the unembedding (``lm_head``).
        attn: Path, inside a layer, to the attention module (it calls transformers' attention interface).
        o_proj: Path, inside the attention module, to the output projection W_O.
        attn_add: Path, inside a layer, to the module whose output is added to the residual as the attention
            part (the attention module itself, or Gemma's post-attention norm).
        mlp_add: Same for the MLP part.
        post_attn_norm: Norm between W_O and the residual, if any; head shares pass through it frozen.
        mlp_down: Path, inside a layer, to the module whose *input* holds the MLP hidden activations.
        layer_norms: Norms inside each layer whose scale is recorded, in execution order.
        norm_kind: ``"rms"`` (x·s·w), ``"rms_plus_one"`` (x·s·(1+w), Gemma) or ``"layer"`` (LayerNorm).
        o_proj_conv1d: GPT-2's ``Conv1D`` stores W_O as (in, out) rather than (out, in).
        pos_embed: Path to a learned position embedding, if the model has one.
        rotary: Path to the rotary embedding module (RoPE), if the model rotates q and k.
    """

    layers: str
    embed: str
    final_norm: str
    unembed: str = "lm_head"
    attn: str = "self_attn"
    o_proj: str = "o_proj"
    attn_add: str = "self_attn"
    mlp_add: str = "mlp"
    post_attn_norm: str | None = None
    mlp_down: str = "mlp.down_proj"
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    norm_kind: str = "rms"
    o_proj_conv1d: bool = False
    pos_embed: str | None = None
    rotary: str | None = "model.rotary_emb"


_LLAMA_LIKE = ArchSpec(layers="model.layers", embed="model.embed_tokens", final_norm="model.norm")

REGISTRY: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": ArchSpec(
        layers="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        attn_add="post_attention_layernorm",
        mlp_add="post_feedforward_layernorm",
        post_attn_norm="post_attention_layernorm",
        layer_norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        norm_kind="rms_plus_one",
    ),
    "gpt2": ArchSpec(
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        attn="attn",
        o_proj="c_proj",
        attn_add="attn",
        mlp_down="mlp.c_proj",
        layer_norms=("ln_1", "ln_2"),
        norm_kind="layer",
        o_proj_conv1d=True,
        pos_embed="transformer.wpe",
        rotary=None,
    ),
}


def supported_architectures() -> list[str]:
    """Return the ``config.model_type`` values geomap supports, sorted."""
    return sorted(REGISTRY)


def spec_for(model_type: str) -> ArchSpec:
    """Return the spec of an architecture, or raise a clear error listing the supported ones."""
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"Architecture {model_type!r} is not supported by geomap. "
            f"Supported model types: {', '.join(supported_architectures())}."
        ) from None


class Anatomy:
    """Resolved view of one loaded causal LM: its modules, sizes and norm arithmetic.

    Args:
        model: A Hugging Face causal LM whose ``config.model_type`` is in `REGISTRY`.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.model_type: str = model.config.model_type
        self.spec = spec_for(self.model_type)

    def _get(self, path: str, root: nn.Module | None = None) -> nn.Module:
        return (root if root is not None else self.model).get_submodule(path)

    # --- sizes ---------------------------------------------------------------------------------
    @cached_property
    def layers(self) -> list[nn.Module]:
        """The decoder layers, in order."""
        return list(self._get(self.spec.layers))

    @property
    def n_layers(self) -> int:
        """Number of decoder layers L (residual boundaries run 0..L)."""
        return len(self.layers)

    @cached_property
    def n_heads(self) -> int:
        """Query heads per layer."""
        return int(self.config.num_attention_heads)

    @cached_property
    def n_kv_heads(self) -> int:
        """Key/value heads per layer (fewer than query heads under grouped-query attention)."""
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    @cached_property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.config.hidden_size)

    @cached_property
    def head_dim(self) -> int:
        """Width of one head's q, k and v."""
        return int(getattr(self.config, "head_dim", None) or self.d_model // self.n_heads)

    @cached_property
    def vocab_size(self) -> int:
        """Rows of the unembedding."""
        return int(self.unembed.weight.shape[0])

    @cached_property
    def context_window(self) -> int:
        """Longest sequence the model accepts."""
        return int(getattr(self.config, "max_position_embeddings", None) or self.config.n_positions)

    # --- modules -------------------------------------------------------------------------------
    @cached_property
    def embed(self) -> nn.Module:
        """The token embedding module (its output includes any model-specific scale)."""
        return self._get(self.spec.embed)

    @cached_property
    def embed_scale(self) -> float:
        """Factor the model multiplies embedding rows by (sqrt(d) on Gemma, 1 elsewhere)."""
        return float(getattr(self.embed, "scalar_embed_scale", 1.0))

    @cached_property
    def final_norm(self) -> nn.Module:
        """The norm applied to the last residual before unembedding."""
        return self._get(self.spec.final_norm)

    @cached_property
    def unembed(self) -> nn.Module:
        """The unembedding (``lm_head``) module."""
        return self._get(self.spec.unembed)

    @property
    def unembed_bias(self) -> torch.Tensor | None:
        """The unembedding bias, if the model has one."""
        return getattr(self.unembed, "bias", None)

    @cached_property
    def final_logit_softcap(self) -> float | None:
        """Gemma-2-style tanh soft cap on the final logits, if configured."""
        cap = getattr(self.config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    @cached_property
    def tied_embeddings(self) -> bool:
        """Whether the unembedding shares its matrix with the token embedding."""
        return self.unembed.weight.data_ptr() == self.embed.weight.data_ptr()

    def attn(self, layer: int) -> nn.Module:
        """The attention module of a layer."""
        return self._get(self.spec.attn, self.layers[layer])

    def attn_add(self, layer: int) -> nn.Module:
        """The module whose output a layer adds to the residual as its attention part."""
        return self._get(self.spec.attn_add, self.layers[layer])

    def mlp_add(self, layer: int) -> nn.Module:
        """The module whose output a layer adds to the residual as its MLP part."""
        return self._get(self.spec.mlp_add, self.layers[layer])

    def mlp_down(self, layer: int) -> nn.Module:
        """The MLP's output projection; its input is the MLP's hidden activation."""
        return self._get(self.spec.mlp_down, self.layers[layer])

    def post_attn_norm(self, layer: int) -> nn.Module | None:
        """The norm between W_O and the residual, if the architecture has one."""
        return self._get(self.spec.post_attn_norm, self.layers[layer]) if self.spec.post_attn_norm else None

    def layer_norms(self, layer: int) -> list[nn.Module]:
        """The norms inside a layer, in the order of `ArchSpec.layer_norms`."""
        return [self._get(name, self.layers[layer]) for name in self.spec.layer_norms]

    def w_o(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_O of a layer as a (d_model, n_heads * head_dim) matrix, and its bias (or None)."""
        proj = self._get(self.spec.o_proj, self.attn(layer))
        weight = proj.weight.T if self.spec.o_proj_conv1d else proj.weight
        return weight, getattr(proj, "bias", None)

    def rope(self, layer: int) -> tuple[str, torch.Tensor, float] | None:
        """The rotation a layer applies to q and k: ``(name, inv_freq (head_dim/2,), attention_scaling)``.

        ``name`` is ``"default"``, or the layer type when the model keeps one rotation per type (Gemma-3's sliding
        and full attention). None for models without RoPE.
        """
        if self.spec.rotary is None:
            return None
        module = self._get(self.spec.rotary)
        if hasattr(module, "inv_freq"):
            return "default", module.inv_freq, float(getattr(module, "attention_scaling", 1.0))
        kind = self.config.layer_types[layer]
        return kind, getattr(module, f"{kind}_inv_freq"), float(getattr(module, f"{kind}_attention_scaling", 1.0))

    @cached_property
    def position_embedding(self) -> nn.Module | None:
        """The learned absolute position embedding, if the model has one."""
        return self._get(self.spec.pos_embed) if self.spec.pos_embed else None

    # --- norm arithmetic ---------------------------------------------------------------------
    def norm_scale(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The scalar a norm multiplies each vector of ``x`` (..., d) by: 1/rms, or 1/std for LayerNorm."""
        eps = getattr(norm, "eps", None)
        eps = getattr(norm, "variance_epsilon", 1e-6) if eps is None else eps
        xf = x.float()
        if self.spec.norm_kind == "layer":
            return torch.rsqrt(xf.var(-1, unbiased=False) + eps)
        return torch.rsqrt(xf.pow(2).mean(-1) + eps)

    def norm_frozen(self, norm: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Apply a norm to ``x`` with its scale frozen at ``scale`` (..., ): linear in ``x``, no bias.

        Summing this over the parts of a vector gives the norm of the whole, minus any LayerNorm bias.
        """
        xf = x.float()
        weight = norm.weight.detach().float()
        if self.spec.norm_kind == "layer":
            xf = xf - xf.mean(-1, keepdim=True)
        elif self.spec.norm_kind == "rms_plus_one":
            weight = 1.0 + weight
        return xf * scale.unsqueeze(-1) * weight

"""Direct logit attribution: a token's final logit as a sum over the parts of the residual stream.

The last residual is a sum, ``resid[L] = resid[0] + Σ_l (attn[l] + mlp[l])``, and each ``attn[l]`` is the sum
of its heads' shares plus W_O's bias. With the final norm's scale frozen at the value it actually applied, the
norm is linear, so ``logit_t = Σ_parts u_t · N(part) + u_t · β + b_t``, where ``N`` is the frozen norm (weight,
and LayerNorm's centring), ``β`` its bias and ``b_t`` the unembedding bias. Those two constants form the
``bias`` component. Logits are before any final soft cap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StreamParts:
    """The residual stream at one position, split into parts (plain data read from the store).

    Attributes:
        embed: (d,) resid[0], the embedding output.
        attn, mlp: (L, d) each layer's attention and MLP updates.
        head_layers: (La,) the layers whose per-head shares were captured at this position (may be empty).
        heads: (La, H, d) their per-head shares of ``attn``.
        attn_bias: (La, d) W_O's bias share at those layers.
        final_scale: The scalar the final norm multiplied by (1/rms, or 1/std).
    """

    embed: np.ndarray
    attn: np.ndarray
    mlp: np.ndarray
    head_layers: np.ndarray
    heads: np.ndarray
    attn_bias: np.ndarray
    final_scale: float


@dataclass(frozen=True)
class Attribution:
    """A logit and its parts.

    Attributes:
        token_id: The token.
        logit: The logit rebuilt from the whole last residual (before any soft cap).
        parts: ``(component, layer, head, value)`` rows: the ``layer`` level (embed, attn, mlp, bias) sums to
            ``logit``; ``head`` rows split each attn into heads and ``attn_bias``.
    """

    token_id: int
    logit: float
    parts: tuple[tuple[str, int | None, int | None, float], ...]

    def layer_level(self) -> list[tuple[str, int | None, int | None, float]]:
        """The parts that sum to the logit."""
        return [p for p in self.parts if p[0] in ("embed", "attn", "mlp", "bias")]


def attribute(loaded, parts: StreamParts, token_id: int) -> Attribution:
    """Decompose token ``token_id``'s logit over ``parts`` (``loaded``: a `geomap.models.loading.LoadedModel`)."""
    import torch

    a = loaded.anatomy
    norm = a.final_norm
    u = a.unembed.weight[token_id].detach().double().cpu()
    scale = torch.tensor(parts.final_scale, dtype=torch.float64)

    def value(x: np.ndarray) -> np.ndarray:
        frozen = a.norm_frozen(norm, torch.as_tensor(np.asarray(x, np.float32)), scale.float()).double()
        return (frozen @ u).numpy()

    bias = 0.0
    if getattr(norm, "bias", None) is not None:
        bias += float(norm.bias.detach().double().cpu() @ u)
    if a.unembed_bias is not None:
        bias += float(a.unembed_bias[token_id])
    return _decompose(value, bias, parts, token_id)


def attribute_weights(weights, parts: StreamParts, token_id: int) -> Attribution:
    """`attribute` from a model's weight slice (`geomap.analysis.weights.Weights`): no model needed."""
    u = np.asarray(weights.unembed[int(token_id)], np.float64)

    def value(x: np.ndarray) -> np.ndarray:
        return weights.frozen(np.asarray(x, np.float32), np.float32(parts.final_scale)).astype(np.float64) @ u

    bias = 0.0
    norm_bias, unembed_bias = weights.array("final_norm_bias"), weights.array("unembed_bias")
    if norm_bias is not None:
        bias += float(np.asarray(norm_bias, np.float64) @ u)
    if unembed_bias is not None:
        bias += float(unembed_bias[int(token_id)])
    return _decompose(value, bias, parts, token_id)


def _decompose(value, bias: float, parts: StreamParts, token_id: int) -> Attribution:
    """The parts' values through ``value`` (frozen norm, then · u), the constant ``bias``, their sum."""
    rows: list[tuple[str, int | None, int | None, float]] = [("embed", None, None, float(value(parts.embed)))]
    attn, mlp = value(parts.attn), value(parts.mlp)
    for layer in range(len(attn)):
        rows += [("attn", layer, None, float(attn[layer])), ("mlp", layer, None, float(mlp[layer]))]
    rows.append(("bias", None, None, bias))
    if len(parts.head_layers):
        heads = value(parts.heads.reshape(-1, parts.heads.shape[-1])).reshape(parts.heads.shape[:2])
        o_bias = value(parts.attn_bias)
        for i, layer in enumerate(parts.head_layers.tolist()):
            rows += [("head", layer, h, float(heads[i, h])) for h in range(heads.shape[1])]
            rows.append(("attn_bias", layer, None, float(o_bias[i])))
    logit = float(sum(r[3] for r in rows if r[0] in ("embed", "attn", "mlp", "bias")))
    return Attribution(int(token_id), logit, tuple(rows))

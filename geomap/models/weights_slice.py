"""Write what the report stage needs from a model's weights as plain arrays beside the store (no torch to read it).

A journey page reads the unembedding (candidate rows, their norms, the embedding's nearest rows), the final norm,
the MLP's output columns (the tokens a neuron pushes) and the rotary frequencies; everything else comes from the
store. `write_slice` writes them once per model into ``<store>.weights/<sha[:16]>/`` (``.npy`` files and
``meta.json``), atomically; `geomap.analysis.weights` reads them memory-mapped. Ingestion writes the slice, and the
CLI or the server writes it for an older store before the first report, so no report loads a model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

# Hugging Face activation names, as a reader of the page knows them.
ACTIVATIONS = {"gelu_pytorch_tanh": "GELU (tanh approximation)", "gelu_new": "GELU (tanh approximation)",
               "gelu": "GELU", "silu": "SiLU (swish)", "swish": "SiLU (swish)", "relu": "ReLU"}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _eps(norm) -> float:
    eps = getattr(norm, "eps", None)
    return float(getattr(norm, "variance_epsilon", 1e-6) if eps is None else eps)


def _rope_base(cfg, name: str) -> float | None:
    """The config's RoPE base for a rotation (per layer type on Gemma-3, one for the model otherwise)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    entry = params.get(name, params) if isinstance(params, dict) else {}
    theta = entry.get("rope_theta") if isinstance(entry, dict) else None
    theta = theta if theta is not None else getattr(cfg, "rope_theta", None)
    return float(theta) if theta is not None else None


def _architecture(loaded) -> dict:
    """The facts a page states about the architecture, from the config and the registry (never assumed)."""
    a, cfg = loaded.anatomy, loaded.anatomy.config
    attn = a.attn(0)
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    kinds = ["global" if t == "full_attention" else "sliding" for t in layer_types] or ["global"] * a.n_layers
    window = getattr(cfg, "sliding_window", None)
    ropes = []
    for ell in range(a.n_layers):
        rope = a.rope(ell)
        if rope is None:
            ropes.append(None)
            continue
        name, inv_freq, scaling = rope
        f = _np(inv_freq)
        base = _rope_base(cfg, name)
        if base is None and len(f) > 1:  # inv_freq[i] = base^(-i/len), the default rotation's rule
            base = float(np.exp(-np.log(f[1]) * len(f)))
        ropes.append({"name": name, "attention_scaling": scaling, "base": base,
                      "scaling": float(getattr(a.attn(ell), "scaling", a.head_dim ** -0.5))})
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None) or getattr(
        cfg, "activation_function", None)
    manifest = loaded.path / "geomap-preset.json"
    source = json.loads(manifest.read_text(encoding="utf-8")).get("source") if manifest.exists() else None
    return {"layer_kinds": kinds, "sliding_window": int(window) if window and "sliding" in kinds else None,
            "ropes": ropes, "qk_norm": hasattr(attn, "q_norm") and hasattr(attn, "k_norm"),
            "activation": act, "activation_name": ACTIVATIONS.get(str(act), str(act)),
            "provenance": source or f"{loaded.name} ({str(loaded.dtype).replace('torch.', '')} weights as loaded)",
            "dtype": str(loaded.dtype).replace("torch.", "")}


def _arrays(loaded) -> dict[str, torch.Tensor]:
    """The tensors of the slice by file name."""
    a, spec = loaded.anatomy, loaded.anatomy.spec
    arrays = {"unembed": a.unembed.weight, "final_norm": a.final_norm.weight}
    if not a.tied_embeddings:
        arrays["embed"] = a.embed.weight
    if getattr(a.final_norm, "bias", None) is not None:
        arrays["final_norm_bias"] = a.final_norm.bias
    if a.unembed_bias is not None:
        arrays["unembed_bias"] = a.unembed_bias
    downs, outs = [], []
    for block in a.layers:
        down = block.get_submodule(spec.mlp_down).weight.detach().float()
        downs.append(down.T if spec.o_proj_conv1d else down)  # (d, d_ff): column n is neuron n's direction
        if spec.mlp_add != "mlp":
            outs.append(block.get_submodule(spec.mlp_add).weight)
    arrays["down"] = torch.stack(downs)
    if outs:
        arrays["mlp_out_norm"] = torch.stack([o.detach().float() for o in outs])
    if a.position_embedding is not None:
        arrays["pos_embed"] = a.position_embedding.weight
    freqs = {}
    for ell in range(a.n_layers):
        rope = a.rope(ell)
        if rope is not None:
            freqs[rope[0]] = rope[1]
    for name, f in freqs.items():
        arrays[f"rope_{name}"] = f

    return arrays


def _spec(loaded) -> dict:
    """The registry entry's fields a layer diagram needs, and layer 0's parameter names and shapes by module."""
    a, spec = loaded.anatomy, loaded.anatomy.spec
    layer = a.layers[0]
    mlp_path = spec.mlp_down.rsplit(".", 1)[0]
    modules = [*spec.layer_norms, spec.attn, mlp_path]
    return {"layer_norms": list(spec.layer_norms), "post_attn_norm": spec.post_attn_norm, "mlp_add": spec.mlp_add,
            "norm_kind": spec.norm_kind, "attn": spec.attn, "o_proj_conv1d": spec.o_proj_conv1d,
            "mlp_path": mlp_path,
            "params": {m: [[n, list(p.shape)] for n, p in layer.get_submodule(m).named_parameters()]
                       for m in modules}}


def write_slice(loaded, folder: str | Path) -> Path:
    """Write the model's report slice into ``folder`` (nothing when it is there); the folder.

    The store's own place for it is `geomap.analysis.weights.slice_folder`.
    """
    folder = Path(folder)
    if (folder / "meta.json").exists():
        return folder
    a, spec = loaded.anatomy, loaded.anatomy.spec
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays = _arrays(loaded)
    for name, value in arrays.items():
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(_np(value)))
    meta = {"weights_sha256": loaded.weights_hash, "model": loaded.name, "model_type": a.config.model_type,
            "norm_kind": spec.norm_kind, "final_norm_eps": _eps(a.final_norm), "embed_scale": float(a.embed_scale),
            "tied": bool(a.tied_embeddings), "softcap": a.final_logit_softcap, "n_layers": a.n_layers,
            "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads, "head_dim": a.head_dim, "d_model": a.d_model,
            "vocab_size": a.vocab_size, "layer_norms": list(spec.layer_norms), "mlp_out_norm": spec.mlp_add != "mlp",
            "spec": _spec(loaded), "architecture": _architecture(loaded)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    try:
        tmp.rename(folder)
    except OSError:  # another writer got there first: theirs is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return folder

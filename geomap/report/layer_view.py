"""The decoder layer as a diagram: its boxes, the real model's matrix names and shapes, and the MLP's neurons.

Per layer the page shows this token's numbers (norm scales, update sizes, residual norms, the most active neurons
with the tokens they push toward).

Shapes come from the loaded model's own parameters, grouped into boxes by the architecture's registry entry
(`geomap.models.registry.ArchSpec`), so Gemma's four in-layer norms and its q/k norms appear where it has them.
"""

from __future__ import annotations

import torch

from geomap.lru import Lru

# Display names of the matrices the seed's algebra uses, by the parameter's module name.
MATRIX_NAMES = {"q_proj": "W_Q", "k_proj": "W_K", "v_proj": "W_V", "o_proj": "W_O", "c_attn": "W_Q|W_K|W_V",
                "gate_proj": "W_gate", "up_proj": "W_up (W₁)", "down_proj": "W_down (W₂)", "c_fc": "W₁",
                "fc1": "W₁", "fc2": "W₂", "q_norm": "q norm", "k_norm": "k norm"}
NEURON_TOKENS = 4  # tokens listed per direction (up / down) for each neuron
# (weights hash) -> {(layer, neuron): (up ids, down ids)}: a neuron's tokens depend on the weights only, so pages
# written in one process (a pipeline's reports, the server) compute each neuron once.
_NEURON_CACHE: Lru[dict[tuple[int, int], tuple]] = Lru(4)  # bounded: 4 models, each at most its neurons


def _params(module, prefix: str, conv1d: bool) -> list[dict]:
    """``{name, param, shape, role}`` for the weights under ``module`` (biases folded into the note)."""
    out = []
    for name, p in module.named_parameters():
        owner, _, kind = name.rpartition(".")
        label = MATRIX_NAMES.get(owner.split(".")[-1], owner or prefix)
        if prefix == "mlp" and owner.endswith("c_proj"):
            label = "W₂"
        elif prefix != "mlp" and owner.endswith("c_proj"):
            label = "W_O"
        shape = list(p.shape)
        if kind == "bias":
            role = "bias"
        elif len(shape) == 2:
            into, out_ = (shape[0], shape[1]) if conv1d else (shape[1], shape[0])
            role = f"{into} → {out_}"
        else:
            role = "per-dimension weight"
        out.append({"name": f"{prefix}.{name}" if prefix else name, "label": label if kind != "bias" else
                    f"{label} bias", "short": label.split(" ")[0], "shape": " × ".join(str(s) for s in shape),
                    "role": role})
    return out


def layer_boxes(loaded) -> list[dict]:
    """The boxes of one decoder layer in execution order, each with its operation and matrices (layer 0's)."""
    a = loaded.anatomy
    spec = a.spec
    layer = a.layers[0]
    norms = list(spec.layer_norms)
    after_attn = spec.post_attn_norm
    after_mlp = spec.mlp_add if spec.mlp_add != "mlp" else None
    before_mlp = next(n for n in norms[1:] if n not in (after_attn, after_mlp))
    weight = "(1 + w)" if spec.norm_kind == "rms_plus_one" else "w"
    how = ("x · (1/std(x − mean)) · w + b" if spec.norm_kind == "layer" else f"x · (1/rms(x)) · {weight}")

    def norm_box(key: str, name: str, title: str, why: str) -> dict:
        return {"key": key, "kind": "norm", "title": title, "module": name, "norm": norms.index(name),
                "op": f"{how}: {why}", "matrices": _params(layer.get_submodule(name), name, False)}

    boxes = [norm_box("norm_attn", norms[0], "norm", "scales the stream before attention reads it")]
    heads = f"{a.n_heads} heads" + (f" sharing {a.n_kv_heads} key/value groups" if a.n_kv_heads != a.n_heads else "")
    boxes.append({"key": "attention", "kind": "attention", "title": "attention", "module": spec.attn,
                  "op": f"q = x·W_Q, k = x·W_K, v = x·W_V per head ({heads}, {a.head_dim} dims each); "
                        "scores q·k/√d over earlier positions, softmax, weighted sum of v, concatenated heads · W_O",
                  "matrices": _params(layer.get_submodule(spec.attn), spec.attn, spec.o_proj_conv1d)})
    if after_attn:
        boxes.append(norm_box("norm_attn_out", after_attn, "post-attention norm",
                              "rescales the attention update before it is added (Gemma's extra norm)"))
    boxes.append({"key": "add_attn", "kind": "add", "title": "+ residual", "op": "h ← h + attention update",
                  "matrices": []})
    boxes.append(norm_box("norm_mlp", before_mlp, "norm", "scales the stream before the MLP reads it"))
    mlp_path = spec.mlp_down.rsplit(".", 1)[0]
    gated = any(n.endswith("gate_proj.weight") for n, _ in layer.get_submodule(mlp_path).named_parameters())
    boxes.append({"key": "mlp", "kind": "mlp", "title": "MLP", "module": mlp_path,
                  "op": ("act(x·W_gate) ⊙ (x·W_up), then ·W_down back to the stream" if gated else
                         "act(x·W₁ + b₁)·W₂ + b₂"),
                  "matrices": _params(layer.get_submodule(mlp_path), mlp_path, spec.o_proj_conv1d)})
    if after_mlp:
        boxes.append(norm_box("norm_mlp_out", after_mlp, "post-MLP norm",
                              "rescales the MLP update before it is added (Gemma's extra norm)"))
    boxes.append({"key": "add_mlp", "kind": "add", "title": "+ residual", "op": "h ← h + MLP update",
                  "matrices": []})
    return boxes


def neuron_directions(loaded, picks: list[tuple[int, int]]) -> torch.Tensor:
    """(n, vocab) logits of each (layer, neuron)'s output direction read through the unembedding.

    The direction is the neuron's column of the MLP's down projection, passed through the post-MLP norm's weight
    where the architecture has one and through the final norm's weight (their 1/rms factors are positive scalars
    that do not change the order of tokens).
    """
    a = loaded.anatomy
    spec = a.spec
    plus_one = spec.norm_kind == "rms_plus_one"
    rows = []
    for layer, neuron in picks:
        block = a.layers[layer]
        down = block.get_submodule(spec.mlp_down).weight.detach().float()
        col = down[neuron] if spec.o_proj_conv1d else down[:, neuron]
        if spec.mlp_add != "mlp":
            w = block.get_submodule(spec.mlp_add).weight.detach().float()
            col = col * ((1.0 + w) if plus_one else w)
        rows.append(col)
    if not rows:
        return torch.zeros((0, a.vocab_size))
    x = torch.stack(rows)
    if spec.norm_kind == "layer":
        x = x - x.mean(dim=1, keepdim=True)
    w = a.final_norm.weight.detach().float()
    x = x * ((1.0 + w) if plus_one else w)
    with torch.no_grad():
        w_u = a.unembed.weight
        return (x.to(w_u.device, w_u.dtype) @ w_u.T).float()


def neuron_rows(loaded, mlp, texts_for) -> dict[int, list[dict]]:
    """Per layer, its most active neurons with the tokens their output direction pushes up and down.

    Args:
        loaded: The model.
        mlp: ``(layer, neurons, activations)`` rows.
        texts_for: A callable from token ids to ``{id: text}``.
    """
    picks = [(int(layer), int(n)) for layer, neurons, _ in mlp for n in neurons]
    cache = _NEURON_CACHE.get_or_put(loaded.weights_hash, dict)
    missing = sorted({p for p in picks if p not in cache})
    if missing:
        logits = neuron_directions(loaded, missing)
        k = min(NEURON_TOKENS, logits.shape[1])
        ups = torch.topk(logits, k, dim=1).indices.cpu().numpy()
        downs = torch.topk(-logits, k, dim=1).indices.cpu().numpy()
        for pick, u, dn in zip(missing, ups, downs):
            cache[pick] = (u, dn)
    up = [cache[p][0] for p in picks]
    down = [cache[p][1] for p in picks]
    texts = texts_for({int(t) for row in up + down for t in row})
    out: dict[int, list[dict]] = {}
    i = 0
    for layer, neurons, acts in mlp:
        entry = out.setdefault(int(layer), [])
        for n, value in zip(neurons, acts):
            raise_, lower = (up[i], down[i]) if value >= 0 else (down[i], up[i])  # the effect here: value × column
            entry.append({"neuron": int(n), "value": float(value),
                          "up": [texts.get(int(t), "?") for t in raise_],
                          "down": [texts.get(int(t), "?") for t in lower]})
            i += 1
    return out

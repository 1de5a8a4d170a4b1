"""The decoder layer as a diagram: its boxes, the real model's matrix names and shapes, and the MLP's neurons.

Per layer the page shows this token's numbers (norm scales, update sizes, residual norms, the most active neurons
with the tokens they push toward).

Shapes come from the loaded model's own parameters, grouped into boxes by the architecture's registry entry
(`geomap.models.registry.ArchSpec`), so Gemma's four in-layer norms and its q/k norms appear where it has them.
"""

from __future__ import annotations

import numpy as np

from geomap.lru import Lru

# Display names of the matrices the seed's algebra uses, by the parameter's module name.
MATRIX_NAMES = {"q_proj": "W_Q", "k_proj": "W_K", "v_proj": "W_V", "o_proj": "W_O", "c_attn": "W_Q|W_K|W_V",
                "gate_proj": "W_gate", "up_proj": "W_up (W₁)", "down_proj": "W_down (W₂)", "c_fc": "W₁",
                "fc1": "W₁", "fc2": "W₂", "q_norm": "q norm", "k_norm": "k norm"}
NEURON_TOKENS = 4  # tokens listed per direction (up / down) for each neuron
# (weights hash) -> {(layer, neuron): (up ids, down ids)}: a neuron's tokens depend on the weights only, so pages
# written in one process (a pipeline's reports, the server) compute each neuron once.
_NEURON_CACHE: Lru[dict[tuple[int, int], tuple]] = Lru(4)  # bounded: 4 models, each at most its neurons


def _params(params: list, prefix: str, conv1d: bool) -> list[dict]:
    """``{name, label, shape, role}`` for the weights ``[[name, shape], ...]`` of a module (biases noted)."""
    out = []
    for name, shape in params:
        owner, _, kind = name.rpartition(".")
        label = MATRIX_NAMES.get(owner.split(".")[-1], owner or prefix)
        if prefix == "mlp" and owner.endswith("c_proj"):
            label = "W₂"
        elif prefix != "mlp" and owner.endswith("c_proj"):
            label = "W_O"
        shape = list(shape)
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


def layer_boxes(meta: dict) -> list[dict]:
    """The boxes of one decoder layer in execution order, each with its operation and matrices (layer 0's).

    Args:
        meta: The model's weight slice description (`geomap.analysis.weights.Weights.meta`).
    """
    spec, arch = meta["spec"], meta["architecture"]
    params = spec["params"]
    norms = list(spec["layer_norms"])
    after_attn = spec["post_attn_norm"]
    after_mlp = spec["mlp_add"] if spec["mlp_add"] != "mlp" else None
    before_mlp = next(n for n in norms[1:] if n not in (after_attn, after_mlp))
    weight = "(1 + w)" if spec["norm_kind"] == "rms_plus_one" else "w"
    how = ("x · (1/std(x − mean)) · w + b" if spec["norm_kind"] == "layer" else f"x · (1/rms(x)) · {weight}")

    def norm_box(key: str, name: str, title: str, why: str) -> dict:
        return {"key": key, "kind": "norm", "title": title, "module": name, "norm": norms.index(name),
                "op": f"{how}: {why}", "matrices": _params(params[name], name, False)}

    boxes = [norm_box("norm_attn", norms[0], "norm", "scales the stream before attention reads it")]
    boxes.append({"key": "attention", "kind": "attention", "title": "attention", "module": spec["attn"],
                  "op": attention_op(meta),
                  "matrices": _params(params[spec["attn"]], spec["attn"], spec["o_proj_conv1d"])})
    if after_attn:
        boxes.append(norm_box("norm_attn_out", after_attn, "post-attention norm",
                              "rescales the attention update before it is added (Gemma's extra norm)"))
    boxes.append({"key": "add_attn", "kind": "add", "title": "+ residual", "op": "h ← h + attention update",
                  "matrices": []})
    boxes.append(norm_box("norm_mlp", before_mlp, "norm", "scales the stream before the MLP reads it"))
    mlp_path = spec["mlp_path"]
    gated = any(n.endswith("gate_proj.weight") for n, _ in params[mlp_path])
    act = arch.get("activation_name") or "act"
    boxes.append({"key": "mlp", "kind": "mlp", "title": "MLP", "module": mlp_path,
                  "op": (f"{act}(x·W_gate) ⊙ (x·W_up), then ·W_down back to the stream" if gated else
                         f"{act}(x·W₁ + b₁)·W₂ + b₂"),
                  "matrices": _params(params[mlp_path], mlp_path, spec["o_proj_conv1d"])})
    if after_mlp:
        boxes.append(norm_box("norm_mlp_out", after_mlp, "post-MLP norm",
                              "rescales the MLP update before it is added (Gemma's extra norm)"))
    boxes.append({"key": "add_mlp", "kind": "add", "title": "+ residual", "op": "h ← h + MLP update",
                  "matrices": []})
    return boxes


def attention_op(meta: dict) -> str:
    """The attention box's operations in the model's own order (q/k norms and RoPE only where it has them)."""
    arch = meta["architecture"]
    heads = f"{meta['n_heads']} heads" + (f" sharing {meta['n_kv_heads']} key/value groups"
                                          if meta["n_kv_heads"] != meta["n_heads"] else "")
    steps = [f"q = x·W_Q, k = x·W_K, v = x·W_V per head ({heads}, {meta['head_dim']} dims each)"]
    if arch.get("qk_norm"):
        steps.append("q_norm and k_norm (RMS norms over each head's dims) on q and k")
    if any(arch.get("ropes") or []):
        steps.append("RoPE rotates q and k by position (the stored q and k are taken after this step)")
    elif meta.get("has_pos_embed", False):
        steps.append("positions were added to the stream at the embedding (learned)")
    steps.append("scores q·k·scale over earlier positions (the window on sliding layers), softmax, weighted sum "
                 "of v, heads concatenated · W_O")
    return "; then ".join(steps)


def neuron_rows(weights, mlp, texts_for) -> dict[int, list[dict]]:
    """Per layer, its most active neurons with the tokens their output direction pushes up and down, and how hard.

    A direction's strength is its top logit in standard deviations over the vocabulary (z). A random direction's
    top token reaches about √(2 ln V) by chance alone; a neuron below `weak_z` is flagged as carrying little
    token signal.

    Args:
        weights: The model's weight slice (`geomap.analysis.weights.Weights`).
        mlp: ``(layer, neurons, activations)`` rows.
        texts_for: A callable from token ids to ``{id: text}``.
    """
    picks = [(int(layer), int(n)) for layer, neurons, _ in mlp for n in neurons]
    cache = _NEURON_CACHE.get_or_put(weights.weights_hash, dict)
    missing = sorted({p for p in picks if p not in cache})
    if missing:
        logits = weights.neuron_logits(missing).astype(np.float64)
        k = min(NEURON_TOKENS, logits.shape[1])
        mean, sd = logits.mean(1, keepdims=True), np.maximum(logits.std(1, keepdims=True), 1e-30)
        z = (logits - mean) / sd
        ups, downs = _top(logits, k), _top(-logits, k)
        for i, pick in enumerate(missing):
            cache[pick] = (ups[i], downs[i], z[i, ups[i]], z[i, downs[i]])
    texts = texts_for({int(t) for p in picks for t in (*cache[p][0], *cache[p][1])})
    weak = weak_z(int(weights.meta["vocab_size"]))
    out: dict[int, list[dict]] = {}
    for layer, neurons, acts in mlp:
        entry = out.setdefault(int(layer), [])
        for n, value in zip(neurons, acts):
            u, d, zu, zd = cache[(int(layer), int(n))]
            # the effect here is value × column: a negative activation swaps what is pushed up and down
            (raise_, zr), (lower, zl) = ((u, zu), (d, zd)) if value >= 0 else ((d, -zd), (u, -zu))
            strength = float(abs(zr[0]))
            entry.append({"neuron": int(n), "value": float(value),
                          "up": [texts.get(int(t), "?") for t in raise_],
                          "down": [texts.get(int(t), "?") for t in lower],
                          "z_up": [round(float(abs(v)), 2) for v in zr],
                          "z_down": [round(float(abs(v)), 2) for v in zl],
                          "strength": strength, "weak": strength < weak})
    return out


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """(n, k) column indices of each row's k largest values, largest first (a partition, then a sort of k)."""
    part = np.argpartition(-x, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(x, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def weak_z(vocab_size: int) -> float:
    """The z a random direction's top token reaches by chance (√(2 ln V)), plus one: below it, little signal."""
    return float(np.sqrt(2 * np.log(max(vocab_size, 2))) + 1.0)

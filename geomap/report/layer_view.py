"""The decoder layer as a diagram: its boxes, the real model's matrix names and shapes, and the MLP's neurons.

Per layer the page shows this token's numbers (norm scales, update sizes, residual norms, the most active neurons
with the tokens they push toward).

Shapes come from the loaded model's own parameters, grouped into boxes by the architecture's registry entry
(`geomap.models.registry.ArchSpec`), so Gemma's four in-layer norms and its q/k norms appear where it has them.
"""

from __future__ import annotations

import numpy as np

# Display names of the matrices the seed's algebra uses, by the parameter's module name.
MATRIX_NAMES = {"q_proj": "W_Q", "k_proj": "W_K", "v_proj": "W_V", "o_proj": "W_O", "c_attn": "W_Q|W_K|W_V",
                "gate_proj": "W_gate", "up_proj": "W_up (W₁)", "down_proj": "W_down (W₂)", "c_fc": "W₁",
                "fc1": "W₁", "fc2": "W₂", "q_norm": "q norm", "k_norm": "k norm"}


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
        rows, cols = 1, shape[0] if shape else 1
        if kind == "bias":
            role = "bias"
        elif len(shape) == 2:
            into, out_ = (shape[0], shape[1]) if conv1d else (shape[1], shape[0])
            role, rows, cols = f"{into} → {out_}", into, out_
        else:
            role = "per-dimension weight"
        out.append({"name": f"{prefix}.{name}" if prefix else name, "label": label if kind != "bias" else
                    f"{label} bias", "short": label.split(" (")[0], "shape": " × ".join(str(s) for s in shape),
                    "role": role, "rows": int(rows), "cols": int(cols), "bias": kind == "bias"})
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
    from geomap.analysis.vocab_lookups import neuron_tokens

    cache = neuron_tokens(weights, [(int(layer), int(n)) for layer, neurons, _ in mlp for n in neurons])
    picks = list(cache)
    texts = texts_for({int(t) for p in picks for t in (*cache[p][0], *cache[p][1])})
    weak = weak_z(int(weights.meta["vocab_size"]))
    out: dict[int, list[dict]] = {}
    for layer, neurons, acts in mlp:
        entry = out.setdefault(int(layer), [])
        for n, value in zip(neurons, acts):
            u, d, zu, zd = (np.asarray(v) for v in cache[(int(layer), int(n))])
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


def weak_z(vocab_size: int) -> float:
    """The z a random direction's top token reaches by chance (√(2 ln V)), plus one: below it, little signal."""
    return float(np.sqrt(2 * np.log(max(vocab_size, 2))) + 1.0)


# Pixels per character, generous: an 11 px bold name and a 10 px shape line get this much room in their slot.
NAME_CHAR, SHAPE_CHAR = 8.0, 6.6


def matrix_layout(boxes: list[dict], width: int = 900, side: int = 170) -> dict:
    """The block's weights drawn to one scale: each matrix a rectangle ``in × out`` (rows = the input's size).

    A matrix maps a row vector x (1 × in) to x·W (1 × out), so W_Q is d_model tall and heads·head_dim wide. One
    scale (pixels per unit) serves every matrix, so their areas compare as their parameter counts; the largest
    side is ``side`` pixels. Per-dimension weights (norms) are drawn as one-unit-tall strips; biases are left out.
    Each matrix gets a slot as wide as its rectangle or its labels, whichever is wider, and slots wrap at ``width``.

    Returns:
        ``{width, height, scale, items}``; an item is ``{label, shape, rows, cols, box, x, y, w, h, slot: [x, y, w,
        h], tx, ty}`` (``tx, ty`` the labels' anchor, under the rectangle).
    """
    mats = [(b, m) for b in boxes for m in b["matrices"] if not m["bias"]]
    if not mats:
        return {"width": width, "height": 0, "scale": 0.0, "items": []}
    scale = side / max(max(m["rows"], m["cols"]) for _, m in mats)
    items, x, y, row_h, gap = [], 0.0, 0.0, 0.0, 14.0
    for b, m in mats:
        w, h = m["cols"] * scale, max(m["rows"] * scale, 2.0) if m["rows"] == 1 else m["rows"] * scale
        shape = f"{m['rows']} × {m['cols']}" if m["rows"] > 1 else f"{m['cols']} (per dimension)"
        slot_w = max(w, NAME_CHAR * len(m["short"]), SHAPE_CHAR * len(shape)) + 4
        slot_h = h + 34
        if x > 0 and x + slot_w > width:
            x, y, row_h = 0.0, y + row_h + gap, 0.0
        items.append({"label": m["short"], "shape": shape, "rows": m["rows"], "cols": m["cols"], "box": b["key"],
                      "x": round(x + 2, 2), "y": round(y, 2), "w": round(w, 3), "h": round(h, 3),
                      "slot": [round(x, 2), round(y, 2), round(slot_w, 2), round(slot_h, 2)],
                      "tx": round(x + 2, 2), "ty": round(y + h + 14, 2)})
        x += slot_w + gap
        row_h = max(row_h, slot_h)
    return {"width": width, "height": round(y + row_h, 1), "scale": scale, "items": items}


def layer_rows(model_weights, text_of, last: int, attn, per_layer: dict, stats: dict, resid, tokens,
               shown) -> list[dict]:
    """Per decoder layer: its heads' weights (drawn window), update norms, norm scales, neurons, residual norms.

    ``model_weights`` is the page's weight slice (`geomap.analysis.weights.Weights`), ``text_of`` its token texts,
    ``last`` the followed position and ``shown`` the positions drawn.
    """
    by_layer: dict[int, dict] = {}
    cols = [p for p in range(last + 1) if p in shown]
    for layer, head, scores, weights, entropy, *_rest in attn:
        entry = by_layer.setdefault(int(layer), {"layer": int(layer), "heads": []})
        top = int(np.argmax(weights[: last + 1]))
        entry["heads"].append({"head": int(head), "scores": [float(scores[p]) for p in cols],
                               "weights": [float(weights[p]) for p in cols], "entropy": float(entropy),
                               "rest": float(sum(weights[: last + 1]) - sum(weights[p] for p in cols)),
                               "bos": float(weights[0]),
                               "top_pos": top, "top_token": tokens[top]["text"], "top_weight": float(weights[top])})
    for layer, attn_norm, mlp_norm, attn_vec in per_layer["contrib"]:
        if int(layer) in by_layer:
            mid = np.asarray(resid[int(layer)], np.float64) + np.asarray(attn_vec, np.float64)
            by_layer[int(layer)].update(attn_norm=float(attn_norm), mlp_norm=float(mlp_norm),
                                        mid_norm=float(np.linalg.norm(mid)))
    for layer, index, name, scale in per_layer["norms"]:
        if int(layer) in by_layer:
            by_layer[int(layer)].setdefault("norms", {})[int(index)] = {
                "name": name, "scale": float(scale), "rms": 1.0 / float(scale) if scale else None}
    for layer, rows in neuron_rows(model_weights, per_layer["mlp"], text_of).items():
        if layer in by_layer:
            by_layer[layer]["neurons"] = rows
    for row in stats["curves"]:
        ell = int(row["layer"]) - 1  # the boundary after decoder layer ell
        if ell in by_layer:
            by_layer[ell].update(resid_norm=row["norm"], cos_final=row["cos_final"])
    kinds, ropes = model_weights.meta["architecture"]["layer_kinds"], model_weights.meta["architecture"]["ropes"]
    for ell, entry in by_layer.items():
        entry["rope_base"] = (ropes[ell] or {}).get("base") if ell < len(ropes) else None
        entry["resid_in"] = float(np.linalg.norm(resid[ell])) if ell in resid else None
        entry["norms"] = [entry.get("norms", {}).get(i) for i in range(len(model_weights.meta["layer_norms"]))]
        entry["kind"] = kinds[ell] if ell < len(kinds) else "global"
    return [by_layer[k] for k in sorted(by_layer)]

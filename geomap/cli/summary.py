"""Plain-data summaries of a `Journey` for the terminal and for JSON (no model objects)."""

from __future__ import annotations

import numpy as np

from geomap.capture.journey import Journey
from geomap.capture.tokens import describe_tokens


def _texts(tokenizer, ids: np.ndarray) -> list[str]:
    return list(describe_tokens(tokenizer, np.asarray(ids).reshape(-1)).texts)


def trace_summary(journey: Journey, tokenizer, lens_top: int = 3, next_top: int = 10) -> dict:
    """The journey of the last token as a JSON-ready dict.

    Returns:
        ``{model, text, tokens: [{id, text}], layers: [{layer, lens_top: [{token, id, prob}], heads:
        [{head, pos, token, weight}]}], next_tokens: [{token, id, prob, logit}]}``. ``layers`` runs over
        residual boundaries 0..L (0 = embedding); ``heads`` at boundary l are those of decoder layer l-1,
        read at the last query position.
    """
    tokens = journey.tokens
    lens, att = journey.lens, journey.attention
    last_lens = int(np.nonzero(lens.positions == len(tokens) - 1)[0][0])
    last_att = np.nonzero(att.positions == len(tokens) - 1)[0]
    layers = []
    for i, boundary in enumerate(lens.layers):
        ids = lens.top.ids[i, last_lens, :lens_top]
        entry = {
            "layer": int(boundary),
            "lens_top": [{"token": t, "id": int(k), "prob": float(p)} for t, k, p in
                         zip(_texts(tokenizer, ids), ids, lens.top.probs[i, last_lens, :lens_top])],
            "heads": [],
        }
        where = np.nonzero(att.layers == boundary - 1)[0]
        if boundary > 0 and len(where) and len(last_att):
            weights = att.weights[where[0], :, last_att[0]]  # (H, T)
            for head, row in enumerate(weights):
                pos = int(row.argmax())
                entry["heads"].append({"head": head, "pos": pos, "token": tokens.texts[pos],
                                       "weight": float(row[pos])})
        layers.append(entry)
    final = journey.final
    ids = final.ids[-1, :next_top]
    return {
        "model": journey.model,
        "text": journey.text,
        "tokens": [{"id": int(k), "text": t} for k, t in zip(tokens.ids, tokens.texts)],
        "layers": layers,
        "next_tokens": [{"token": t, "id": int(k), "prob": float(p), "logit": float(z)} for t, k, p, z in
                        zip(_texts(tokenizer, ids), ids, final.probs[-1, :next_top], final.logits[-1, :next_top])],
    }


def format_trace(summary: dict) -> str:
    """Render `trace_summary` as terminal text."""
    lines = [f"geomap trace · {summary['model']} · {summary['text']!r}", "", "tokens:"]
    lines.append("  " + "  ".join(f"[{i}] {t['text']!r} ({t['id']})" for i, t in enumerate(summary["tokens"])))
    lenses = ["  ".join(f"{c['token']!r} {c['prob']:.3f}" for c in entry["lens_top"]) for entry in summary["layers"]]
    width = max([52, *map(len, lenses)])  # the widest row sets the column: the heads line up below one another
    lines += ["", f"layer  {'logit lens at the last token (top 3)':<{width}}  where each head looks most"]
    for entry, lens in zip(summary["layers"], lenses):
        heads = "  ".join(f"h{h['head']}→[{h['pos']}]{h['token']!r} {h['weight']:.2f}" for h in entry["heads"])
        lines.append(f"{entry['layer']:>5}  {lens:<{width}}  {heads}".rstrip())
    lines += ["", "next token (final distribution):"]
    shown = max([20, *(len(repr(c["token"])) for c in summary["next_tokens"])])
    for rank, c in enumerate(summary["next_tokens"], 1):
        lines.append(f"  {rank:>2}. {c['token']!r:<{shown}} p={c['prob']:.4f}  logit={c['logit']:.3f}")
    return "\n".join(lines)

"""Lay out 2-D maps for SVG: scaling, a zoomed frame on the end of a path, labels that do not overlap.

Input maps are the plain dicts of :func:`geomap.report.data.journey_data` (``background``, ``path``, ``tokens``, each a
list of ``{x, y, ...}``); outputs are lists of dicts in SVG pixel coordinates, ready for the templates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CHAR_W, LABEL_H = 6.4, 12.0  # glyph width (with room to spare) and line height of the 10 px monospace labels


@dataclass(frozen=True)
class Frame:
    """The data rectangle ``[x0, x1] × [y0, y1]`` drawn into a ``width × height`` box with ``pad`` pixels of margin."""

    x0: float
    x1: float
    y0: float
    y1: float
    width: int
    height: int
    pad: int = 14

    @classmethod
    def around(cls, points, width: int, height: int, pad: int = 14, grow: float = 0.0) -> Frame:
        """The smallest frame holding ``points``, widened by ``grow`` of its span on each side."""
        xs, ys = [float(p["x"]) for p in points], [float(p["y"]) for p in points]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        gx, gy = (x1 - x0) * grow, (y1 - y0) * grow
        return cls(x0 - gx, x1 + gx, y0 - gy, y1 + gy, width, height, pad)

    def inside(self, p) -> bool:
        """Whether a data point lies in the frame."""
        return self.x0 <= p["x"] <= self.x1 and self.y0 <= p["y"] <= self.y1

    def place(self, p) -> dict:
        """``p`` with its pixel position ``sx, sy`` added (y grows downwards in SVG)."""
        sx = (self.x1 - self.x0) or 1.0
        sy = (self.y1 - self.y0) or 1.0
        return {**p, "sx": round(self.pad + (p["x"] - self.x0) * (self.width - 2 * self.pad) / sx, 1),
                "sy": round(self.height - self.pad - (p["y"] - self.y0) * (self.height - 2 * self.pad) / sy, 1)}


def scale_points(points, width: int = 420, height: int = 320, pad: int = 14) -> list[dict]:
    """Map ``{x, y, ...}`` points into an SVG box, all sharing one scale."""
    if not points:
        return []
    frame = Frame.around(points, width, height, pad)
    return [frame.place(p) for p in points]


def _overlaps(box, boxes) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in boxes)


def _label(anchor: dict, x: float, y: float, box: tuple) -> dict:
    return {"x": round(x, 1), "y": round(y, 1), "ax": anchor["sx"], "ay": anchor["sy"], "text": anchor["text"],
            "members": [anchor["text"]], "box": box, "cls": anchor.get("cls", "")}


def _free_spot(anchor: dict, w: float, width: int, height: int, boxes: list) -> tuple[float, float] | None:
    """The baseline start nearest the anchor where a ``w``-wide label fits inside the box and overlaps nothing.

    Candidate spots on a 4-pixel grid are tried nearest first, so the search stops at the first free one.
    """
    spots = [(x, y) for y in range(int(LABEL_H), int(height) - 1, 4) for x in range(0, max(int(width - w), 0) + 1, 4)]
    spots.sort(key=lambda p: (p[0] - anchor["sx"]) ** 2 + (p[1] - anchor["sy"]) ** 2)
    for x, y in spots:
        box = (x, y - LABEL_H + 2, x + w, y + 2)
        if box[2] <= width and not _overlaps(box, boxes):
            return float(x), float(y)
    return None


def clip_segments(points: list[tuple[float, float]], width: float, height: float) -> list[list[tuple[float, float]]]:
    """A polyline cut to the box ``[0, width] × [0, height]``: the runs of it that lie inside (Liang–Barsky)."""
    runs: list[list[tuple[float, float]]] = []
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        dx, dy, lo, hi = x1 - x0, y1 - y0, 0.0, 1.0
        for p, q in ((-dx, x0), (dx, width - x0), (-dy, y0), (dy, height - y0)):
            if p == 0:
                if q < 0:
                    lo, hi = 1.0, 0.0
            else:
                t = q / p
                lo, hi = (max(lo, t), hi) if p < 0 else (lo, min(hi, t))
        if lo > hi:
            continue
        a = (round(x0 + lo * dx, 1), round(y0 + lo * dy, 1))
        b = (round(x0 + hi * dx, 1), round(y0 + hi * dy, 1))
        if runs and runs[-1][-1] == a:
            runs[-1].append(b)
        else:
            runs.append([a, b])
    return runs


def place_labels(anchors: list[dict], width: int, height: int, taken: list | None = None) -> list[dict]:
    """Place labels greedily so that none overlaps another.

    Each label tries four spots around its anchor; one that fits nowhere joins the label nearest to it (shown as
    ``a +2``, with the full list in ``title``).

    Args:
        anchors: ``{sx, sy, text}`` in priority order (earlier labels win space).
        width: Box width, labels stay inside.
        height: Box height.
        taken: Pixel boxes ``(x0, y0, x1, y1)`` already occupied.

    Returns:
        One ``{x, y, ax, ay, text, label, title, members, box}`` per shown label (``x, y`` the text baseline start,
        ``box`` the pixels it reserves).
    """
    boxes = list(taken or [])
    shown: list[dict] = []
    for a in anchors:
        w = CHAR_W * (len(a["text"]) + 11) + 2  # room for a " & NNN more" suffix if others merge in later
        spots = [(a["sx"] + 4, a["sy"] - 3), (a["sx"] - 4 - w, a["sy"] - 3),
                 (a["sx"] - w / 2, a["sy"] - 6), (a["sx"] - w / 2, a["sy"] + LABEL_H + 2)]
        for x, y in spots:
            box = (x, y - LABEL_H + 2, x + w, y + 2)
            if box[0] >= 0 and box[2] <= width and box[1] >= 0 and box[3] <= height and not _overlaps(box, boxes):
                boxes.append(box)
                shown.append(_label(a, x, y, box))
                break
        else:
            if shown:
                near = min(shown, key=lambda s: (s["ax"] - a["sx"]) ** 2 + (s["ay"] - a["sy"]) ** 2)
                near["members"].append(a["text"])
            else:  # the first label is never lost: the free spot nearest its anchor
                spot = _free_spot(a, w, width, height, boxes)
                if spot is None:  # no room anywhere: its first spot, pulled inside the box
                    spot = (min(max(spots[0][0], 0.0), max(width - w, 0.0)),
                            min(max(spots[0][1], LABEL_H - 2), height - 2.0))
                x, y = spot
                box = (x, y - LABEL_H + 2, x + w, y + 2)
                boxes.append(box)
                shown.append(_label(a, x, y, box))
    for s in shown:
        extra = len(s["members"]) - 1
        s["label"] = s["text"] if not extra else f"{s['text']} & {extra} more"
        s["title"] = " · ".join(s["members"])
    return shown


def map_view(m: dict, width: int = 420, height: int = 320, zoom: bool = False, show=str) -> dict:
    """A journey map laid out for SVG, whole or zoomed on the last third of the path.

    Args:
        m: ``{background, path, tokens}`` point lists.
        width: SVG width.
        height: SVG height.
        zoom: Frame the last third of the path (where the prediction forms) instead of everything.
        show: How a token's text is displayed (for example with visible whitespace).

    Returns:
        ``{background, path, labels, layer_labels, hidden, zoom}``: placed points, the token labels that fit, layer
        numbers along the path, and how many token directions fall outside a zoomed frame.
    """
    everything = m["background"] + m["path"] + m["tokens"]
    if not everything:
        return {"background": [], "path": [], "labels": [], "layer_labels": [], "hidden": 0, "zoom": zoom,
                "segments": [], "outside": 0}
    if zoom and m["path"]:
        tail = m["path"][-max(2, len(m["path"]) // 3):]
        frame = Frame.around(tail, width, height, grow=0.6)
        full = Frame.around(everything, width, height)
        # never zoom in further than a tenth of the full span: tokens and neighbours need room
        cx, cy = (frame.x0 + frame.x1) / 2, (frame.y0 + frame.y1) / 2
        hx = max((frame.x1 - frame.x0) / 2, (full.x1 - full.x0) / 20)
        hy = max((frame.y1 - frame.y0) / 2, (full.y1 - full.y0) / 20)
        frame = Frame(cx - hx, cx + hx, cy - hy, cy + hy, width, height)
    else:
        frame = Frame.around(everything, width, height)
    bg = [frame.place(p) for p in m["background"] if frame.inside(p)]
    path = [frame.place(p) for p in m["path"]]
    for i, p in enumerate(path):
        p["inside"] = 0 <= p["sx"] <= width and 0 <= p["sy"] <= height
        p["last"] = i == len(path) - 1
    toks = [frame.place({**t, "text": show(t["token"]), "cls": "own" if t.get("own") else ""})
            for t in m["tokens"] if frame.inside(t)]
    dots = [(p["sx"] - 4, p["sy"] - 4, p["sx"] + 4, p["sy"] + 4) for p in path if p["inside"]]
    visible = [p for p in path if p["inside"]]
    labels = place_labels(toks, width, height, taken=dots)  # token labels first: they matter most
    layer_anchors = [{**p, "text": str(p["layer"])} for p in visible[::-1]]
    layer_labels = place_labels(layer_anchors, width, height, taken=dots + [s["box"] for s in labels])
    return {"background": bg, "path": path, "labels": labels, "layer_labels": layer_labels,
            "segments": clip_segments([(p["sx"], p["sy"]) for p in path], width, height),
            "outside": len(path) - len(visible), "hidden": len(m["tokens"]) - len(toks), "zoom": zoom,
            "ticks": ticks(frame)}


def ticks(frame: Frame, count: int = 4) -> dict:
    """Axis ticks of a frame: ``{"x": [{sx, label}], "y": [{sy, label}]}`` at round data values."""
    def steps(lo: float, hi: float) -> list[float]:
        span = (hi - lo) or 1.0
        raw = span / count
        mag = 10 ** math.floor(math.log10(raw))
        step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
        first = math.ceil(lo / step) * step
        return [first + i * step for i in range(count + 2) if first + i * step <= hi + 1e-12]

    return {"x": [{"sx": frame.place({"x": v, "y": frame.y0})["sx"], "label": f"{v:g}"}
                  for v in steps(frame.x0, frame.x1)],
            "y": [{"sy": frame.place({"x": frame.x0, "y": v})["sy"], "label": f"{v:g}"}
                  for v in steps(frame.y0, frame.y1)]}


def needs_zoom(m: dict) -> bool:
    """Whether the end of the path is crowded into a small part of the whole map (then a zoomed view helps)."""
    everything = m["background"] + m["path"] + m["tokens"]
    if len(m["path"]) < 3 or not everything:
        return False
    full = Frame.around(everything, 1, 1)
    tail = Frame.around(m["path"][-max(2, len(m["path"]) // 3):], 1, 1)
    return (tail.x1 - tail.x0) < 0.25 * (full.x1 - full.x0) and (tail.y1 - tail.y0) < 0.25 * (full.y1 - full.y0)


def palette(values: list, top: int = 8, kind: str = "token") -> dict:
    """Colours for the ``top`` most frequent values (the rest share grey): ``{value: css colour}``.

    ``kind="tag"`` uses another palette, lighter and with hues between the tokens' (a golden-angle walk, so the
    first tags differ most), so that a tag never wears a token's colour on the same page.
    """
    counts: dict = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    ranked = sorted(counts, key=lambda v: (-counts[v], str(v)))
    hue, step, style = (0, 47, "65%,42%") if kind == "token" else (23, 137.5, "55%,56%")
    colours = {v: f"hsl({(hue + i * step) % 360:g},{style})" for i, v in enumerate(ranked[:top])}
    return {v: colours.get(v, "#9aa3ad") for v in ranked}

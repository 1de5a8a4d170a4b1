"""Line charts with scales: points, round ticks on both axes, the data's range (for the templates' `curve`)."""

from __future__ import annotations

import math


def round_steps(lo: float, hi: float, count: int = 4) -> list[float]:
    """Round values (1, 2 or 5 × 10^k apart) covering [lo, hi], about ``count`` of them."""
    span = (hi - lo) or abs(hi) or 1.0
    raw = span / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    out, v = [], first
    while v < hi + step * 0.999:
        out.append(round(v, 12))
        v += step
    return out


def chart(values, width: int = 300, height: int = 110, x0: int = 0) -> dict:
    """A line chart of ``values`` at x = x0, x0 + 1, …: SVG points, ticks and the data's first/last/min/max.

    The y range is widened to round ticks so the line never leaves the frame; None / NaN values are skipped.
    """
    pts = [(i + x0, float(v)) for i, v in enumerate(values) if v is not None and not math.isnan(float(v))]
    if not pts:
        return {"points": "", "xticks": [], "yticks": [], "first": None, "last": None, "min": None, "max": None}
    ys = [v for _, v in pts]
    yt = round_steps(min(ys), max(ys))
    lo, hi = yt[0], yt[-1] if yt[-1] > yt[0] else yt[0] + 1.0
    xlo, xhi = x0, max(x0 + len(values) - 1, x0 + 1)
    sx = lambda x: (x - xlo) / (xhi - xlo) * width  # noqa: E731
    sy = lambda y: height - (y - lo) / (hi - lo) * height  # noqa: E731
    xt = [x for x in round_steps(xlo, xhi, 6) if xlo <= x <= xhi and float(x).is_integer()]
    return {"points": " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts),
            "xticks": [{"s": round(sx(x), 1), "label": f"{int(x)}"} for x in xt],
            "yticks": [{"s": round(sy(y), 1), "label": f"{y:g}"} for y in yt],
            "first": ys[0], "last": ys[-1], "min": min(ys), "max": max(ys)}

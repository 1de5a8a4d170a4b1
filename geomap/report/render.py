"""Render report data as HTML: autoescaped Jinja templates, JSON through a safe dumper, no network loads."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
from importlib.resources import files
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from geomap.report import svgmap
from geomap.report.charts import chart

ASSETS = ("geomap.css", "geomap.js")


@functools.cache
def script_hash() -> str:
    """The CSP source of the one script a single-file page inlines: ``'sha256-…'`` of ``geomap.js``."""
    digest = hashlib.sha256(asset_text("geomap.js").encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def csp(served: bool = False) -> str:
    """The pages' Content-Security-Policy.

    Nothing comes from the network; the bundled script runs from its file or, inlined, by its hash (never
    ``'unsafe-inline'`` for scripts); a served page may call its own server (the index's text box).
    """
    connect = "'self'" if served else "'none'"
    return ("default-src 'none'; img-src data:; style-src 'self' 'unsafe-inline'; "
            f"script-src 'self' {script_hash()}; connect-src {connect}; form-action 'none'; base-uri 'none'")


def __getattr__(name: str):
    """``CSP``: the file pages' policy (kept for importers; computed on first use, it hashes the script)."""
    if name == "CSP":
        return csp()
    raise AttributeError(name)


def safe_json(value) -> Markup:
    """JSON for a ``<script type="application/json">`` block: ``<``, ``>``, ``&``, U+2028 and U+2029 escaped."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=_default)
    for char, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, code)
    return Markup(text)  # noqa: S704 (escaped above; only ever placed inside a JSON script block)


def _default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def fmt(value, digits: int = 3) -> str:
    """A number for display (``–`` for missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    v = float(value)
    if digits == 0 and abs(v) < 1e15:
        return f"{v:,.0f}"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** -digits):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}"


def data_value(value) -> str:
    """A number for a ``data-value`` attribute: 7 significant digits (float32's), ``""`` for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (int, str)):
        return str(value)
    return f"{float(value):.7g}"


def showtok(text) -> str:
    """A token for display: whitespace-only tokens made visible (␣ space, ⏎ newline, ⇥ tab)."""
    if text is None:
        return "?"
    if text.strip():
        return text
    return text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def heat(value, top: float = 1.0) -> str:
    """A background colour for a value in [0, top] (white to deep blue)."""
    x = 0.0 if value is None else max(0.0, min(1.0, float(value) / (top or 1.0)))
    light = int(round(97 - 55 * x))
    return f"background:hsl(215,70%,{light}%);color:{'#fff' if x > 0.6 else '#111'}"


def diverge(value, top: float) -> str:
    """A background colour for a signed value: red below zero, green above."""
    x = 0.0 if value is None else max(-1.0, min(1.0, float(value) / (top or 1.0)))
    hue = 140 if x >= 0 else 0
    light = int(round(97 - 50 * abs(x)))
    return f"background:hsl({hue},60%,{light}%)"


def num(value, digits: int = 3, src: str = "", bind: str = "", tag: str = "span") -> Markup:
    """A number as the pages show it: ``<span class="num" data-value=…>`` with its source and binding.

    A Python function rather than a template macro: a page shows thousands of numbers, and a macro call costs about
    ten times as much as this.
    """
    attrs = f' data-src="{escape(src)}"' if src else ""
    if bind:
        attrs += f' data-bind="{escape(bind)}" data-digits="{digits}"'
    return Markup(f'<{tag} class="num"{attrs} data-value="{escape(data_value(value))}">'  # noqa: S704 (escaped)
                  f"{escape(fmt(value, digits))}</{tag}>")


def snum(value, digits: int = 3, src: str = "", bind: str = "") -> Markup:
    """`num` inside an SVG ``<text>``: a ``<tspan>``."""
    return num(value, digits, src, bind, tag="tspan")


def tok(text) -> Markup:
    """A token as the pages show it (whitespace made visible, isolated for right-to-left text)."""
    return Markup(f'<bdi class="tok">{escape(showtok(text))}</bdi>')  # noqa: S704 (escaped)


STRIP_NEGATIVE, STRIP_POSITIVE = (33, 102, 172), (178, 24, 43)  # the strips' ends: blue below zero, red above


def strip_colour(x: float) -> str:
    """The strips' diverging colour for x in [-1, 1] (white at 0); `geomap.js` paints the cells with the same rule."""
    t = min(1.0, abs(float(x)))
    end = STRIP_NEGATIVE if x < 0 else STRIP_POSITIVE
    r, g, b = (round(255 + (c - 255) * t) for c in end)
    return f"rgb({r},{g},{b})"


def polyline(values, width: int = 260, height: int = 70, pad: int = 4) -> str:
    """SVG ``points`` for a line through ``values`` (None skipped)."""
    pts = [(i, float(v)) for i, v in enumerate(values) if v is not None and not math.isnan(float(v))]
    if not pts:
        return ""
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    span, n = (hi - lo) or 1.0, max(len(values) - 1, 1)
    return " ".join(f"{pad + i * (width - 2 * pad) / n:.1f},{height - pad - (v - lo) * (height - 2 * pad) / span:.1f}"
                    for i, v in pts)


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    """Compiled templates kept between processes (a cold CLI report skips compiling them), when writable."""
    from geomap.paths import cache_home

    folder = cache_home() / "jinja"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return jinja2.FileSystemBytecodeCache(str(folder))


@functools.cache
def environment() -> jinja2.Environment:
    """The report templates, autoescaped (built once per process: compiling them costs more than rendering)."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("geomap.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             bytecode_cache=_bytecode_cache())
    env.filters.update(dv=data_value, fmt=fmt, showtok=showtok, heat=heat, diverge=diverge, polyline=polyline,
                       json=safe_json)
    from geomap.report.layer_view import matrix_layout

    env.globals.update(num=num, snum=snum, tok=tok, chart=chart, strip_colour=strip_colour, matrix_layout=matrix_layout,
                       scale_points=svgmap.scale_points, map_view=svgmap.map_view,
                       needs_zoom=svgmap.needs_zoom, palette=svgmap.palette, showtok=showtok, max=max, min=min,
                       abs=abs, len=len, enumerate=enumerate)
    return env


def asset_text(name: str) -> str:
    """The text of a bundled asset (``geomap.css`` or ``geomap.js``)."""
    return files("geomap.report").joinpath("assets", name).read_text(encoding="utf-8")


def render(template: str, data, single_file: bool = False, asset_prefix: str = "assets/", served: bool = False) -> str:
    """Render a report page; assets are inlined with ``single_file``, else linked from ``asset_prefix``.

    ``served``: the page comes from a server (its policy lets the page call that server).
    """
    # The bundled assets are geomap's own files, trusted: inlined as they are (escaping would break the script).
    assets = {name: Markup(asset_text(name)) for name in ASSETS} if single_file else None  # noqa: S704
    return environment().get_template(template).render(d=data, csp=csp(served), assets=assets,
                                                       asset_prefix=asset_prefix)


def write_assets(folder: Path) -> None:
    """Copy the shared assets next to reports that link them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ASSETS:
        target = folder / name
        text = asset_text(name)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")

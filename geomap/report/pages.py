"""Write reports to disk: journey pages, and the index of all reports in a folder."""

from __future__ import annotations

import html
import re
from pathlib import Path

from geomap.report.render import render, write_assets


def write_page(html_text: str, out: Path, single_file: bool, index: bool = True) -> Path:
    """Write one page (and, unless ``single_file``, the shared assets beside it); refresh the folder's index.

    ``index=False``: leave the index to the caller (a build writing many pages refreshes it once, at its end).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if not single_file:
        write_assets(out.parent / "assets")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html_text, encoding="utf-8")
    tmp.replace(out)
    if index:
        write_index(out.parent)
    return out


def journey_page(data, single_file: bool = False, served: bool = False) -> str:
    """The journey report's HTML (``served``: for a server, whose own API the page may call)."""
    return render("journey.html.j2", data, single_file, served=served)


def write_index(folder: Path) -> Path:
    """``index.html`` listing every report in ``folder`` (by the title of each page).

    An existing ``index.html`` that is not geomap's own index is left alone.
    """
    entries = []
    def order(page: Path) -> tuple:  # journeys by prompt id and position, then the other pages
        numbers = [int(n) for n in re.findall(r"\d+", page.stem)]
        return (not page.stem.startswith("journey"), page.stem.split("-")[0], numbers)

    for page in sorted(folder.glob("*.html"), key=order):
        if page.name == "index.html":
            continue
        with page.open(encoding="utf-8", errors="replace") as f:  # the head only: pages are large
            head = f.read(20000).split("</head>")[0]
        match = re.search(r"<title>(.*?)</title>", head, re.S)
        meta = {k: html.unescape(v) for k, v in re.findall(r'<meta name="geomap-([a-z]+)" content="([^"]*)">', head)}
        kind = page.stem.split("-")[0]
        tags = [t for t in meta.get("tags", "").split(",") if t]
        entries.append({"href": page.name, "title": html.unescape(match.group(1)) if match else page.stem,
                        "kind": meta.get("kind", kind), "follow": meta.get("follow"), "pos": meta.get("pos"),
                        "prediction": meta.get("prediction"), "prob": _float(meta.get("prob")),
                        "group": tags[0] if tags else ("journeys" if kind == "journey" else "runs and comparisons")})
    groups: dict[str, list] = {}
    for e in entries:
        groups.setdefault(e["group"], []).append(e)
    out = folder / "index.html"
    if out.exists() and "<title>geomap reports</title>" not in out.read_text(encoding="utf-8", errors="replace")[:4000]:
        return out  # an index.html geomap did not write is never overwritten
    out.write_text(render("index.html.j2", {"entries": entries, "groups": groups}, single_file=True), encoding="utf-8")
    return out


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None

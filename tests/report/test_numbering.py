"""One numbering on every page: "block L" for the decoder layer L, "boundary b" for the residual state b.

The journey page states the rule at its top (boundary 0 is the embedding output; block L reads boundary L and writes
L + 1); a bare "layer 18" would be neither, and the compare page sits beside it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from geomap.capture import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.report.api import compare_report, journey_report
from geomap.store.writer import PromptSpec

LAYER_NUMBER = re.compile(r"\blayers?\s*(?:<[^>]*>\s*)*\d")  # "layer 3", "layer <span …>3</span>"


@pytest.fixture(scope="module")
def pages(tiny_models, tmp_path_factory):
    model = tiny_models["llama"]
    folder = tmp_path_factory.mktemp("numbering")
    db = folder / "n.duckdb"
    ingest(model, [PromptSpec("The storm is"), PromptSpec("The market is")], db,
           CaptureConfig(attn_positions="all", lens_positions="all"), progress=False)
    journey = journey_report(db, 1, out=folder / "journey-1.html", loaded=model)
    pair = compare_report(db, 1, 2, out=folder / "compare-1-2.html", loaded=model)
    return {"journey": journey.html, "compare": pair.html}


def _shown(html: str) -> str:
    """What a reader can see or hover: the page less its scripts, styles and attributes other than title."""
    html = re.sub(r"<(script|style)\b.*?</\1>", "", html, flags=re.S)
    return re.sub(r"<(\w+)[^>]*>", r"<\1>", html)


@pytest.mark.parametrize("kind", ["journey", "compare"])
def test_no_bare_layer_numbers(pages, kind):
    hits = [m.group(0) for m in LAYER_NUMBER.finditer(_shown(pages[kind]))]
    assert hits == [], hits[:5]


def test_the_map_hover_names_the_boundary():
    script = (Path(__file__).resolve().parents[2] / "geomap" / "report" / "assets" / "geomap.js").read_text()
    assert '"layer " +' not in script and '"boundary " + ell' in script


def test_compare_names_each_prompts_winning_token(pages):
    section = pages["compare"].split('id="attribution"')[1].split("</section>")[0]
    assert "A's" in section and "B's" in section and "<th>block</th>" in section

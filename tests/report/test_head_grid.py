"""The journey's block × head grid: a focus that is never position 0."""

from __future__ import annotations

import numpy as np
import pytest

from geomap.capture import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.report.api import journey_report
from geomap.report.head_view import grid
from geomap.store.writer import PromptSpec
from tests.storedb import rows


def _attn(weights: list[float]) -> list[tuple]:
    return [(0, 0, None, np.asarray(weights), 0.5)]


def test_the_focus_skips_position_0_and_the_token_itself():
    tokens = [{"text": t} for t in ("<bos>", "a", "b", "c")]
    cell = grid(_attn([0.5, 0.1, 0.3, 0.1]), 3, tokens)[0][0]
    assert (cell["focus"], cell["token"], cell["focus_weight"], cell["bos"]) == (2, "b", 0.3, 0.5)


def test_a_token_at_position_1_has_no_focus_to_name():
    """Only position 0 precedes it: the cell must not name position 0 as the focus the caption excludes."""
    cell = grid(_attn([0.88, 0.12]), 1, [{"text": "<bos>"}, {"text": "Hello"}])[0][0]
    assert cell["focus"] is None and cell["token"] is None and cell["focus_weight"] is None
    assert cell["bos"] == 0.88


@pytest.fixture(scope="module")
def pages(tiny_models, tmp_path_factory):
    model = tiny_models["llama"]
    folder = tmp_path_factory.mktemp("grid")
    db = folder / "g.duckdb"
    ingest(model, [PromptSpec("The storm is"), PromptSpec("a")], db, CaptureConfig(attn_positions="all"),
           progress=False)
    assert rows(db, "SELECT max(pos) FROM tokens WHERE prompt_id = 2")[0][0] == 1  # <bos> and one token
    return {pid: journey_report(db, pid, out=folder / f"journey-{pid}.html", loaded=model) for pid in (1, 2)}


def test_a_one_token_prompt_says_there_is_no_earlier_token(pages):
    html = pages[2].html
    grid_html = html.split('id="inside-head"')[1].split("</table>")[0]
    assert grid_html.count("data-no-focus") == grid_html.count('class="cell')
    assert "no token stands between position 0 and it" in html

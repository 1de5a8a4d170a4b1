"""The journey's block × head grid: a focus that is never position 0, and a legible ``bos`` weight on every cell."""

from __future__ import annotations

import re

import numpy as np
import pytest

from geomap.capture import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.report.api import journey_report
from geomap.report.head_view import grid
from geomap.report.render import heat
from geomap.store.writer import PromptSpec
from tests.report.test_reports import browser, open_page  # noqa: F401 (the Chromium fixture)
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


def _rgb(css: str) -> tuple[float, ...]:
    r, g, b = (float(x) for x in re.findall(r"[\d.]+", css)[:3])
    return r / 255, g / 255, b / 255


def _contrast(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    def lum(c):
        f = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in c]
        return 0.2126 * f[0] + 0.7152 * f[1] + 0.0722 * f[2]

    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


@pytest.mark.browser
def test_in_chromium_every_bos_weight_is_legible_on_its_cell(pages, browser):  # noqa: F811 (the fixture)
    """The small bos weight keeps a readable contrast on the grid's palette, from its palest cell to its darkest."""
    page, events = open_page(browser, pages[1].path)
    cell = page.locator("td.cell").first
    assert cell.locator("small.bos").count() == 1 and events["console"] == []
    for weight in (0.0, 0.5, 0.61, 0.8, 1.0):  # a tiny random model's heads rarely focus: paint each shade
        cell.evaluate("(e, style) => e.setAttribute('style', style)", heat(weight))
        fg, bg = cell.evaluate("e => [getComputedStyle(e.querySelector('small.bos')).color, "
                               "getComputedStyle(e).backgroundColor]")
        assert _contrast(_rgb(fg), _rgb(bg)) >= 3.0, (weight, fg, bg)  # the grey of old fell to 1.2
    page.close()

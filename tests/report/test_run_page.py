"""The run page: head entropies that are the mean its heading names, and no table pushing the page sideways."""

from __future__ import annotations

import numpy as np
import pytest

from geomap.capture import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.report.api import run_report
from geomap.store.writer import PromptSpec
from tests.report.test_reports import browser, open_page, parse  # noqa: F401 (the Chromium fixture)
from tests.storedb import rows

LONG = "Pneumonoultramicroscopicsilicovolcanoconiosis" + "_" * 160 + " is a"
PROMPTS = ["The storm is", "a", "The capital of France is the city of", LONG]


@pytest.fixture(scope="module")
def run_page(tiny_models, tmp_path_factory):
    model = tiny_models["llama"]
    folder = tmp_path_factory.mktemp("run")
    db = folder / "r.duckdb"
    ingest(model, [PromptSpec(t) for t in PROMPTS], db, CaptureConfig(attn_positions="all"), progress=False)
    return db, run_report(db, 1, out=folder / "run-1.html", loaded=model), model


def test_head_entropy_is_the_mean_over_every_captured_query(run_page):
    """Prompts of different lengths: the mean of per-prompt means is not the mean over the run's queries."""
    db, report, model = run_page
    shown = [float(v) for _, src, v, _ in parse(report.html).numbers if src == "head_stats.entropy"]
    pooled = [r[0] for r in rows(db, """SELECT avg(a.entropy) FROM attention a JOIN prompts p ON p.id = a.prompt_id
                                        WHERE p.run_id = 1 GROUP BY a.layer, a.head ORDER BY a.layer, a.head""")]
    assert len(shown) == model.anatomy.n_layers * model.anatomy.n_heads
    np.testing.assert_allclose(shown, pooled, rtol=1e-5)


def test_depth_is_numbered_by_boundary(run_page):
    _, report, _ = run_page
    depth = report.html.split('id="depth"')[1].split("</section>")[0]
    assert "prediction depth (boundary)" in depth and "(layer)" not in depth


@pytest.mark.browser
def test_in_chromium_wide_tables_scroll_inside_their_card(run_page, browser):  # noqa: F811 (the fixture)
    _, report, _ = run_page
    page, events = open_page(browser, report.path)
    assert events["console"] == []
    assert page.evaluate("document.documentElement.scrollWidth") <= 1200  # the viewport: no sideways page
    outside = page.evaluate("""() => [...document.querySelectorAll('main table')]
        .filter(t => !t.closest('.scroll')).map(t => t.closest('section').id)""")
    assert outside == []  # a table as wide as the model is deep (19 depths on Gemma) scrolls in its card
    narrow = page.evaluate("""() => { const c = document.querySelector('#prompts td.text');
        return c.getBoundingClientRect().right <= c.closest('section').getBoundingClientRect().right; }""")
    assert narrow  # a long unbroken prompt wraps inside its cell
    page.close()


def test_a_one_prompt_run_says_why_it_has_no_map(tiny_models, tmp_path):
    """Two empty frames and a legend with nothing after its colon told the reader nothing."""
    model = tiny_models["llama"]
    db = tmp_path / "one.duckdb"
    ingest(model, [PromptSpec("The storm is")], db, CaptureConfig(), progress=False)
    html = run_report(db, 1, out=tmp_path / "run-1.html", loaded=model).html
    section = html.split('id="map"')[1].split("</section>")[0]
    assert "data-no-map" in section and "this run has 1" in section
    assert '<figure class="map"' not in section

"""The intervention report pages, operated in Chromium: a trace heatmap, an aggregate, a steering chart, diffs."""

from __future__ import annotations

import numpy as np
import pytest

from geomap.ingest.interventions import sweep
from geomap.intervene import Noise, Site, Spec
from geomap.intervene.spec import vector_bytes
from geomap.report.intervention_view import intervention_reports
from tests.report.test_reports import browser  # noqa: F401 (the Chromium fixture the other report tests use)

TEXT, OTHER, THIRD = "The storm is coming over the hills", "The storm is moving over the hills", \
    "The rain is coming over the hills"


@pytest.fixture(scope="module")
def pages(tiny_models, tmp_path_factory):
    loaded = tiny_models["llama"]
    folder = tmp_path_factory.mktemp("reports")
    db = folder.parent / "store.duckdb"
    n_layers = loaded.anatomy.n_layers
    trace = [Spec("trace", TEXT, Site("resid", layer), (pos,), noise=Noise((1, 2), 3.0, 1))
             for layer in range(n_layers + 1) for pos in range(-4, 0)]
    sweep(loaded, trace, db, targets=[" the"], name="trace <b>storm</b>")
    pairs = [Spec("patch", target, Site("resid", layer), (pos,), source=source)
             for target, source in ((TEXT, OTHER), (THIRD, TEXT)) for layer in range(n_layers + 1)
             for pos in (-2, -1)]
    sweep(loaded, pairs, db, targets=[" the"], name="pairs")
    rng = np.random.default_rng(0)
    steer = [Spec("steer", TEXT, Site("resid", 1), (-1,), vector=vector_bytes(rng.standard_normal(64)),
                  vector_label="random", coefficient=a) for a in (0, 2, 4, 8, 16, 32)]
    sweep(loaded, steer, db, targets=[" the", " over"], name="steer")
    written = intervention_reports(db, folder)
    return folder, written, n_layers


def test_pages_are_written_and_escaped(pages):
    folder, written, n_layers = pages
    names = {p.name for p in written}
    assert len([n for n in names if n.startswith("intervention-")]) == 4 * (n_layers + 1) + 4 * (n_layers + 1) + 6
    trace_page = next(p for p in written if p.name.startswith("intervene-") and "storm" in p.read_text())
    html = trace_page.read_text()
    assert "trace <b>storm</b>" not in html and "trace &lt;b&gt;storm&lt;/b&gt;" in html
    assert "intervene-" in (folder / "index.html").read_text()


def test_in_chromium_heatmap_links_diff_and_chart(pages, browser):  # noqa: F811 (the fixture)
    folder, written, n_layers = pages
    page = browser.new_page()
    errors, requests = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: requests.append(r.url))
    sweeps = sorted(p for p in written if p.name.startswith("intervene-"))
    trace_page, pairs_page, steer_page = sweeps
    page.goto(trace_page.as_uri())
    cells = page.locator("td.hcell")
    assert cells.count() == 4 * (n_layers + 1)
    assert page.locator("table.heatmap th.col").count() == len(page.locator("table.heatmap th.col").all())
    values = [float(v) for v in cells.evaluate_all("els => els.map(e => e.dataset.value)")]
    assert max(values) > min(values)  # the restored runs differ: the colour scale has something to show
    cells.first.locator("a").click()
    page.wait_for_load_state()
    assert page.url.split("/")[-1].startswith("intervention-")
    rows = page.locator("table[data-diff] tr[data-layer]")
    assert rows.count() == n_layers + 1
    _ranks_shown_are_stored(page, folder.parent / "store.duckdb", n_layers)
    page.goto(pairs_page.as_uri())
    first = page.locator("td.hcell a").first
    assert "±" in first.get_attribute("title")  # the aggregate shows its confidence interval
    first.click()
    links = page.locator("#pairs a")
    assert links.count() == 2 * 2 * (n_layers + 1)
    page.goto(steer_page.as_uri())
    assert page.locator("circle[data-point]").count() == 12
    page.locator("circle[data-point]").nth(5).click(force=True)
    page.wait_for_load_state()
    assert "intervention-" in page.url and page.locator("table[data-diff]").count() == 1
    diverged = page.locator("tr.diverged")
    assert diverged.count() <= 1
    assert not errors, errors
    assert all(u.startswith("file://") for u in requests), requests


def _ranks_shown_are_stored(page, db, n_layers: int) -> None:
    """The diff's per-layer target ranks, clean and intervened, are the effects table's, layer by layer."""
    import duckdb

    iid = int(page.url.split("intervention-")[1].split(".")[0])
    con = duckdb.connect(str(db), read_only=True)
    try:
        stored = con.execute("SELECT token_id, lens_ranks, clean_lens_ranks, first_flip_layer FROM effects "
                             "WHERE intervention_id = ?", [iid]).fetchall()
    finally:
        con.close()
    assert stored
    def shown(attr: str, token_id: int) -> list[int]:
        cells = page.locator(f"table[data-diff] td[{attr}='{token_id}'] span.num")
        return [int(float(v)) for v in cells.evaluate_all("els => els.map(e => e.dataset.value)")]

    for token_id, ranks, clean, flip in stored:
        assert len(ranks) == len(clean) == n_layers + 1
        assert shown("data-rank", token_id) == list(ranks) and shown("data-clean-rank", token_id) == list(clean)
        marked = page.locator("table[data-diff] tr.diverged")
        assert marked.count() == (0 if flip is None else 1)
        if flip is not None:
            assert marked.get_attribute("data-layer") == str(flip)


def test_diff_page_header_names_the_site_not_a_python_object(pages):
    folder, written, _ = pages
    for path in written:
        if not path.name.startswith("intervention-"):
            continue
        header = path.read_text().split("<header>")[1].split("</header>")[0]
        assert "bound method" not in header and "dtype" not in header, header[:200]
        assert " head " not in header  # every site here is the residual stream: no head to name


def test_sweep_pages_say_what_was_done_and_where_the_states_come_from(pages):
    """A pair's unpatched run is the prompt's own, not a clean one; the source run and the steered site are named."""
    _, written, _ = pages
    sweeps = {p.read_text().split("<title>")[1].split("</title>")[0]: p.read_text()
              for p in written if p.name.startswith("intervene-")}
    names = ("storm&lt;/b&gt;", "pairs", "steer")
    trace, pairs, steer = (next(h for t, h in sweeps.items() if t.endswith(n)) for n in names)
    assert "Clean run: p =" in trace and "source run" not in trace  # noise: the effects' clean run is the clean one
    what = pairs.split("<p data-what>")[1].split("</p>")[0]
    assert OTHER in what and TEXT in what and "Clean run" not in pairs and "Nothing restored" in pairs
    assert "<code>random</code> to the resid at boundary 1, position " in steer
    diff = next(p.read_text() for p in written if p.name.startswith("intervention-") and "data-source" in p.read_text())
    assert "clean” below is this prompt's own run" in diff


def test_diff_pages_number_residual_sites_by_boundary(pages):
    """A resid site's layer is a residual boundary (0 = the embedding output), and so is each row of the diff."""
    _, written, _ = pages
    html = next(p.read_text() for p in written if p.name.startswith("intervention-"))
    header = html.split("<header>")[1].split("</header>")[0]
    assert " · boundary " in header and " layer " not in header
    assert "<th>boundary</th>" in html and "<th>layer</th>" not in html and "layer by layer" not in html

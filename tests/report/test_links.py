"""Every link of the built reports resolves: a pipeline's pages on disk (as file:// reads them) and a served store's
pages (over HTTP), continuations included; the checker itself catches a dangling page and a dangling anchor."""

from __future__ import annotations

import pytest

from geomap.capture import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.ingest.generation import continue_prompts
from geomap.report.api import pipeline_reports
from geomap.report.linkcheck import check_folder, check_served
from geomap.store.db import StoreError
from geomap.store.writer import PromptSpec, prompt_key
from tests.report.test_journey_controls import browser  # noqa: F401 - the Chromium fixture
from tests.serve.test_serve import start_server, stop_server

PROMPTS = ["The storm is", "The market is", "Paris is the capital of"]


@pytest.fixture(scope="module")
def built(tiny_models, tiny_dirs, tmp_path_factory):
    from geomap.ingest.runs import model_identity

    model = tiny_models["llama"]
    folder = tmp_path_factory.mktemp("links")
    db = folder / "l.duckdb"
    config = CaptureConfig(attn_positions="all", lens_positions="all")
    ingest(model, [PromptSpec(t) for t in PROMPTS], db, config, progress=False)
    continue_prompts(db, model, PROMPTS, 2, config, progress=False)
    keys = [prompt_key(model_identity(model), config.to_json(), t) for t in PROMPTS]
    written = pipeline_reports(db, keys, folder / "reports", model, progress=False)
    return db, folder / "reports", written, tiny_dirs["llama"]


def test_every_link_of_a_pipelines_reports_resolves(built):
    _, reports, written, _ = built
    pages = sorted(p.name for p in reports.glob("*.html"))
    assert written >= len(PROMPTS) + 1
    assert sum(name.startswith("journey-") and "-p" in name for name in pages) == 2 * len(PROMPTS), pages
    assert len([n for n in pages if n.startswith("run-")]) == 2, pages  # the prompts' run and the continuations'
    assert check_folder(reports) == []


def test_continuation_steps_decode_exactly(built):
    """Each continuation step keeps the full logits it was decided from, so its page decodes exactly."""
    import duckdb
    import numpy as np

    from geomap.analysis import load

    db, reports, _, _ = built
    con = duckdb.connect(str(db), read_only=True)
    try:
        steps = con.execute("SELECT prompt_id, pos, chosen_id FROM decisions WHERE source = 'generate'").fetchall()
        assert len(steps) == 2 * len(PROMPTS)
        for pid, pos, chosen in steps:
            cand = load.candidates(con, load.prompt_info(con, pid), pos)
            assert cand.complete and int(cand.ids[np.argmax(cand.logits)]) == chosen  # greedy: the argmax
    finally:
        con.close()
    for pid, pos, _ in steps:
        assert '"complete": true' in (reports / f"journey-{pid}-p{pos}.html").read_text(encoding="utf-8")


def test_continuation_pages_link_their_neighbouring_steps_in_the_sticky_nav(built):
    import re

    _, reports, _, _ = built
    for page in sorted(reports.glob("journey-*-p*.html")):
        nav = page.read_text(encoding="utf-8").split('<nav class="toc"')[1].split("</nav>")[0]
        steps = re.findall(r'data-step-nav="(prev|next)"', nav)
        assert steps in (["next"], ["prev"], ["prev", "next"]), (page.name, steps)  # two steps each here


def test_a_build_in_worker_processes_writes_the_same_pages(built, tmp_path):
    """Two processes, each reading the store read-only, write byte for byte the pages one process writes."""
    import duckdb

    db, reports, written, _ = built
    con = duckdb.connect(str(db), read_only=True)
    try:
        keys = [k for (k,) in con.execute("SELECT key FROM prompts WHERE parent_id IS NULL").fetchall()]
    finally:
        con.close()
    assert pipeline_reports(db, keys, tmp_path, progress=False, workers=2) == written
    names = sorted(p.name for p in reports.glob("*.html"))
    assert names == sorted(p.name for p in tmp_path.glob("*.html"))
    for name in names:
        assert (tmp_path / name).read_bytes() == (reports / name).read_bytes(), name


def test_a_pages_neighbours_at_several_layers_are_each_layers_own(built):
    from geomap.store.query import neighbor_rows, neighbor_rows_by_layer

    db = built[0]
    found = neighbor_rows_by_layer(db, 1, [0, 1, 2, 99], 1, 4)
    assert list(found) == [0, 1, 2, 99] and isinstance(found[99], StoreError)
    for layer in (0, 1, 2):
        assert found[layer] == neighbor_rows(db, 1, layer, 1, 4)


@pytest.fixture(scope="module")
def server(built):
    db, _, _, model_dir = built
    proc, port = start_server(db, model_dir)
    yield f"http://127.0.0.1:{port}"
    log = stop_server(proc)
    assert "Traceback" not in log, log


def test_every_link_of_a_served_store_resolves(server):
    import urllib.request

    assert check_served(server) == []
    with urllib.request.urlopen(f"{server}/reports/journey-1.html", timeout=120) as resp:
        policy = resp.headers["content-security-policy"]
    scripts = policy.split("script-src")[1].split(";")[0]
    assert "'sha256-" in scripts and "'unsafe-inline'" not in scripts


@pytest.mark.browser
def test_a_typed_prompt_reaches_its_journey_page(server, browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"{server}/reports/index.html")
    page.fill("[data-ask-text]", "A sentence nobody stored before")
    page.click("[data-ask] button")
    page.wait_for_function("document.querySelector('[data-ask-status]') === null || "
                           "document.querySelector('[data-ask-status]').textContent.length > 0", timeout=30_000)
    page.wait_for_url("**/reports/journey-*.html", timeout=300_000)
    page.wait_for_selector("#decoding", timeout=300_000)  # after the run's map is fitted (202 pages reload)
    assert "A sentence nobody stored before" in page.locator("#summary").text_content()
    assert errors == [], errors
    page.close()


def test_the_checker_finds_a_missing_page_and_a_missing_anchor(tmp_path):
    (tmp_path / "index.html").write_text('<a href="a.html#here">a</a> <a href="#top">top</a><h1 id="top">x</h1>')
    (tmp_path / "a.html").write_text('<p id="there"></p><a href="gone.html">g</a><a href="index.html#nope">i</a>'
                                     '<a href="https://example.org/">out</a>')
    problems = check_folder(tmp_path)
    assert any("a.html#here (no element #here)" in p for p in problems), problems
    assert any("gone.html (no such page)" in p for p in problems), problems
    assert any("index.html#nope (no element #nope)" in p for p in problems), problems
    assert any("leaves the reports" in p for p in problems), problems
    assert not any("#top" in p for p in problems), problems


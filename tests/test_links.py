"""Every link of the built reports resolves: a pipeline's pages on disk (as file:// reads them) and a served store's
pages (over HTTP), continuations included; the checker itself catches a dangling page and a dangling anchor."""

from __future__ import annotations

import pytest

from geomap.capture import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.ingest.generation import continue_prompts
from geomap.report.api import pipeline_reports
from geomap.report.linkcheck import check_folder, check_served
from geomap.store.writer import PromptSpec, prompt_key
from tests.test_serve import start_server, stop_server

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


def test_every_link_of_a_served_store_resolves(built):
    db, _, _, model_dir = built
    proc, port = start_server(db, model_dir)
    try:
        assert check_served(f"http://127.0.0.1:{port}") == []
    finally:
        log = stop_server(proc)
    assert "Traceback" not in log, log


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

"""Journey reports: every section and itinerary step present, numbers equal to the store, safe with hostile text,
and working in headless Chromium (no console errors, no network, live decoding controls)."""

from __future__ import annotations

import html
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import numpy as np
import pytest

from geomap.analysis.api import decode
from geomap.analysis.decoding import Strategy
from geomap.capture import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.ingest.generation import generate
from geomap.report.api import journey_report
from geomap.report.render import showtok
from geomap.store.writer import PromptSpec
from tests.forked import geomap as forked_geomap
from tests.storedb import rows

XSS = "</script><img src=x onerror=alert(1)> <bos> <s>"
PROMPTS = ["The storm is", "The market is", "Paris is the capital of", XSS]
SECTIONS = ["tokenization", "embedding", "position", "layer", "inside-head", "attention", "lens", "trajectory",
            "decoding", "geometry", "neighbours", "append"]
CHROMIUM = "/usr/bin/chromium"


class Page(HTMLParser):
    """Sections, itinerary steps and the numbers inside them, by their data attributes."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, dict]] = []
        self.sections: list[str] = []
        self.steps: dict[str, list[str]] = {}
        self.numbers: list[tuple[str, str, str | None, str | None]] = []  # (section, src, value, step)
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag in ("br", "input", "meta", "link", "circle", "rect", "polyline"):
            return
        self.stack.append((tag, attrs))
        if tag == "section" and "id" in attrs:
            self.sections.append(attrs["id"])
        if "num" in (attrs.get("class") or "").split():
            section = next((a["id"] for t, a in reversed(self.stack) if t == "section" and "id" in a), None)
            step = next((a["data-step"] for _, a in reversed(self.stack) if "data-step" in a), None)
            self.numbers.append((section, attrs.get("data-src", ""), attrs.get("data-value"), step))

    def handle_startendtag(self, tag, attrs):  # <rect .../>: opens and closes itself, never an ancestor's end
        depth = len(self.stack)
        self.handle_starttag(tag, attrs)
        del self.stack[depth:]

    def handle_endtag(self, tag):
        if all(t != tag for t, _ in self.stack):  # </circle> of an element never pushed
            return
        while self.stack:
            if self.stack.pop()[0] == tag:
                break


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


@pytest.fixture(params=["llama", pytest.param("real", marks=pytest.mark.real)], scope="module")
def reports(request, tiny_models, tmp_path_factory):
    model = request.getfixturevalue("real") if request.param == "real" else tiny_models[request.param]
    folder = tmp_path_factory.mktemp(f"reports-{request.param}")
    db = folder / "r.duckdb"
    ingest(model, [PromptSpec(t) for t in PROMPTS], db, CaptureConfig(attn_positions="all", lens_positions="all"),
           progress=False)
    decode(db, 1, Strategy(temperature=0.8, top_p=0.9, seed=2))
    generate(db, model, PROMPTS[0], 3, Strategy())
    out = folder / "reports"
    pages = {pid: journey_report(db, pid, out=out / f"journey-{pid}.html", loaded=model) for pid in (1, 4)}
    single = journey_report(db, 1, out=folder / "single" / "journey-1.html", single_file=True, loaded=model)
    return model, db, pages, single


def test_every_section_and_itinerary_step_shows_stored_numbers(reports):
    _, _, pages, _ = reports
    page = parse(pages[1].html)
    assert page.sections == SECTIONS
    with_numbers = {step for _, _, value, step in page.numbers if step and value not in (None, "")}
    assert {str(i) for i in range(1, 18)} <= with_numbers, sorted(with_numbers)
    docs = (Path(__file__).resolve().parents[2] / "docs" / "journey.md").read_text(encoding="utf-8")
    for step in range(1, 18):
        assert f"| {step} |" in docs, f"docs/journey.md does not map itinerary step {step}"


def test_numbers_match_the_store(reports):
    model, db, pages, _ = reports
    page = parse(pages[1].html)
    values = lambda src: [float(v) for _, s, v, _ in page.numbers if s == src and v not in (None, "")]  # noqa: E731
    n = rows(db, "SELECT n_tokens FROM prompts WHERE id = 1")[0][0]
    assert values("tokens.token_id") == [r[0] for r in rows(
        db, "SELECT token_id FROM tokens WHERE prompt_id = 1 ORDER BY pos")]
    lens = rows(db, "SELECT probs[1:8] FROM lens WHERE prompt_id = 1 AND pos = ? ORDER BY layer", n - 1)
    np.testing.assert_allclose(values("lens.probs"), [p for (row,) in lens for p in row], rtol=1e-5)
    weights = rows(db, "SELECT weights[1:?] FROM attention WHERE prompt_id = 1 AND pos = ? ORDER BY layer, head",
                    n, n - 1)
    inside = values("attention.weights")
    head_table = inside[-len(weights) * n:]  # the per-layer table follows the inside-one-head row
    np.testing.assert_allclose(head_table, [w for (row,) in weights for w in row], rtol=1e-5, atol=1e-7)
    scores = rows(db, "SELECT scores[1:?] FROM attention WHERE prompt_id = 1 AND pos = ? ORDER BY layer, head",
                   n, n - 1)
    np.testing.assert_allclose(values("attention.scores")[-len(scores) * n:], [v for (row,) in scores for v in row],
                               rtol=1e-5, atol=1e-6)
    logits = np.asarray(rows(db, "SELECT flatten(list(logits ORDER BY chunk)) FROM final_logits "
                                 "WHERE prompt_id = 1")[0][0])
    logits = logits[~np.isnan(logits)]
    np.testing.assert_allclose(values("final_logits"), np.sort(logits)[::-1][:15], rtol=1e-5)
    from geomap.analysis.api import attribute

    counted = rows(db, "SELECT count(*) FROM attributions")[0][0]
    assert counted == 0  # the page only reads: the analysis below stores them, with the model
    attribute(db, 1, loaded=model)
    parts = rows(db, "SELECT value FROM attributions WHERE prompt_id = 1 AND level = 'layer' "
                      "AND component IN ('attn', 'mlp')")
    shown = values("attributions.value")
    assert len(shown) >= len(parts)
    assert np.isclose(sorted(shown)[-1], max(max(r[0] for r in parts), max(shown)), rtol=1e-5)
    depth = rows(db, "SELECT prediction_depth FROM position_stats WHERE prompt_id = 1 AND pos = ?", n - 1)[0][0]
    assert values("position_stats.prediction_depth") == [depth]
    # The append-and-repeat loop links each generation step to the journey of the token it decided from.
    gen, n0 = rows(db, "SELECT id, n_tokens FROM prompts WHERE parent_id = 1")[0][0], n
    for step in range(3):
        pos = n0 - 1 + step
        step_page = pages[1].path.parent / f"journey-{gen}-p{pos}.html"
        assert f'href="{step_page.name}"' in pages[1].html and step_page.exists()
    step_page = parse(step_page.read_text(encoding="utf-8"))
    shown = [float(v) for _, s_, v, _ in step_page.numbers if s_ == "lens.probs"]
    lens = rows(db, "SELECT probs[1:8] FROM lens WHERE prompt_id = ? AND pos = ? ORDER BY layer", gen, pos)
    np.testing.assert_allclose(shown, [p for (row,) in lens for p in row], rtol=1e-5)


def test_trajectory_maps_label_the_top_candidates(reports):
    _, db, pages, _ = reports
    n = rows(db, "SELECT n_tokens FROM prompts WHERE id = 1")[0][0]
    top = rows(db, """SELECT v.text FROM (SELECT unnest(token_ids[1:5]) AS t FROM next_token
                      WHERE prompt_id = 1 AND pos = ?) c JOIN vocab v ON v.token_id = c.t
                      JOIN runs r ON r.weights_sha256 = v.weights_sha256 AND r.id = 1""", n - 1)
    trajectory = pages[1].html.split('id="trajectory"')[1].split("</section>")[0]
    for figure in trajectory.split("</figure>")[:-1]:
        if "zoomed" in figure:
            continue
        labels = re.findall(r'class="utok own"><title>(.*?)</title>', figure)
        members = {m for t in labels for m in html.unescape(t).split(" · ")}
        assert {showtok(t) for (t,) in top} <= members, (members, top)


def test_hostile_text_is_shown_not_run(reports):
    _, _, pages, _ = reports
    text = pages[4].html
    page = parse(text)
    assert "img" not in page.tags and "s" not in page.tags
    assert html.escape(XSS, quote=False) in text
    body, _, data = text.rpartition('<script type="application/json" id="geomap-data">')
    assert "</script><img" not in data.split("</script>")[0]
    assert 'http-equiv="Content-Security-Policy"' in text and "default-src 'none'" in html.unescape(text)


def test_page_weight_files_and_jupyter(reports):
    _, _, pages, single = reports
    path = pages[1].path
    assert path.stat().st_size < 1_000_000
    assert (path.parent / "assets" / "geomap.js").exists() and 'src="assets/geomap.js"' in pages[1].html
    assert "<script src" not in single.html and "geomap-data" in single.html
    index = (path.parent / "index.html").read_text(encoding="utf-8")
    assert "journey-1.html" in index and "journey-4.html" in index
    frame = pages[1]._repr_html_()
    assert frame.startswith("<iframe") and 'sandbox="allow-scripts"' in frame and "<script" not in frame


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("GEOMAP_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing; `make test` installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


def open_page(browser, path: Path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    events = {"console": [], "requests": [], "dialogs": []}
    page.on("console", lambda m: events["console"].append((m.type, m.text)) if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: events["console"].append(("pageerror", str(e))))
    page.on("request", lambda r: events["requests"].append(r.url))
    page.on("dialog", lambda d: (events["dialogs"].append(d.message), d.dismiss()))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, events


@pytest.mark.browser
def test_in_chromium_no_errors_no_network_live_controls(reports, browser, tmp_path):
    _, _, pages, single = reports
    for report in (pages[1], single):
        page, events = open_page(browser, report.path)
        assert events["console"] == []
        assert all(url.startswith("file://") for url in events["requests"]), events["requests"]
        before = page.locator("[data-dist] tr:nth-child(2) td:nth-child(4)").text_content()
        page.fill("input[name=temperature]", "2.2")
        page.locator("input[name=temperature]").dispatch_event("input")
        after = page.locator("[data-dist] tr:nth-child(2) td:nth-child(4)").text_content()
        assert float(after) < float(before), (before, after)
        page.check("input[value=scores]")
        assert page.locator("[data-heat-table=scores]").is_visible()
        assert not page.locator("[data-heat-table=weights]").is_visible()
        page.fill("input[name=top_k]", "3")
        page.locator("input[name=top_k]").dispatch_event("input")
        assert page.locator("[data-dist] tr.kept").count() == 3
        shot = tmp_path / "shot.png"
        page.screenshot(path=str(shot))
        from PIL import Image

        colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50, "the screenshot is blank"
        page.close()


@pytest.mark.browser
def test_in_chromium_the_xss_prompt_runs_nothing(reports, browser):
    _, _, pages, _ = reports
    page, events = open_page(browser, pages[4].path)
    page.wait_for_timeout(300)
    assert events["dialogs"] == [] and events["console"] == []
    assert page.locator("img").count() == 0
    assert XSS in page.locator("header").text_content()
    page.close()


def test_reports_folder_is_rewritten_atomically(reports, tmp_path):
    _, _, pages, _ = reports
    shutil.copytree(pages[1].path.parent, tmp_path / "copy")
    assert not list((tmp_path / "copy").glob("*.tmp"))


def test_run_and_compare_reports_match_the_store(reports):
    from geomap.report.api import compare_report, run_report

    model, db, pages, _ = reports
    folder = pages[1].path.parent
    run = run_report(db, 1, out=folder / "run-1.html", loaded=model)
    page = parse(run.html)
    assert page.sections == ["map", "curves", "depth", "heads", "prompts"]
    depths = [r[0] for r in rows(db, "SELECT prediction_depth FROM journey WHERE run_id = 1")]
    counts = [float(v) for _, s, v, _ in page.numbers if s == "journey.prediction_depth"]
    assert counts == [float(depths.count(d)) for d in range(model.anatomy.n_layers + 1)]
    probs = [float(v) for _, s, v, _ in page.numbers if s == "journey.top1_prob"]
    np.testing.assert_allclose(probs, [r[0] for r in rows(
        db, "SELECT top1_prob FROM journey WHERE run_id = 1 ORDER BY prompt_id")], rtol=1e-6)
    assert "journey-1.html" in run.html and run.html.count("<circle") == len(depths)  # by token
    assert run.html.count('class="tagpt"') == len(depths)  # by tag, as squares of another palette
    by_token = run.html.split('data-colour="token"')[1].split("</figure>")[0]
    fills = dict(re.findall(r'style="fill:([^"]+)"><title>#\d+ .*? → (.*?)</title>', by_token))
    predicted = [r[0] for r in rows(db, "SELECT top1_token FROM journey WHERE run_id = 1")]
    assert len(set(fills)) == min(len(set(predicted)), 8) + (len(set(predicted)) > 8)  # one colour per token, grey rest
    pair = compare_report(db, 1, 2, out=folder / "compare-1-2.html", loaded=model)
    assert parse(pair.html).sections == ["summary", "states", "heads", "lens", "decoding", "attribution"]
    cosines = [float(v) for _, s_, v, _ in parse(pair.html).numbers if s_ == "states.cosine"]
    assert len(cosines) == model.anatomy.n_layers + 1 and all(-1 - 1e-6 <= c <= 1 + 1e-6 for c in cosines)
    assert pair.html.count("A: #1") >= 3 and pair.html.count("B: #2") >= 3  # every column names its prompt
    assert "compare-1-2.html" in (folder / "index.html").read_text(encoding="utf-8")


def test_a_pipeline_run_writes_its_reports(tiny_dirs, tmp_path):
    from click.testing import CliRunner

    from geomap.cli import cli

    (tmp_path / "p.txt").write_text("The storm is\nThe market is\n", encoding="utf-8")
    (tmp_path / "tiny.toml").write_text(
        f'name = "tiny"\nmodel = "{tiny_dirs["llama"]}"\nstore = "{tmp_path / "s.duckdb"}"\n'
        f'reports = "{tmp_path / "reports"}"\n[capture]\nattn_positions = "all"\n[[sources]]\npath = "p.txt"\n',
        encoding="utf-8")
    done = CliRunner().invoke(cli, ["run", str(tmp_path / "tiny.toml")])
    assert done.exit_code == 0, done.output
    names = sorted(p.name for p in (tmp_path / "reports").glob("*.html"))
    assert names == ["index.html", "journey-1.html", "journey-2.html", "run-1.html"]
    again = CliRunner().invoke(cli, ["run", str(tmp_path / "tiny.toml")])
    assert again.exit_code == 0 and "1 written" in again.output  # only the run report is rewritten


def test_report_commands(tiny_dirs, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from geomap.cli import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("The storm is\nThe market is\n", encoding="utf-8")
    runner = CliRunner()
    db = str(tmp_path / "s.duckdb")
    assert runner.invoke(cli, ["ingest", "p.txt", "--db", db, "--model", str(tiny_dirs["llama"]),
                               "--attn-positions", "all"]).exit_code == 0
    done = runner.invoke(cli, ["report", "journey", "--prompt", "2", "--db", db, "--single-file"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "reports" / "journey-2.html").exists() and not (tmp_path / "reports" / "assets").exists()
    assert runner.invoke(cli, ["report", "compare", "--prompt", "1", "--prompt", "2", "--db", db]).exit_code == 0
    assert runner.invoke(cli, ["report", "run", "--run", "1", "--db", db]).exit_code == 0
    bad = runner.invoke(cli, ["report", "compare", "--prompt", "1", "--db", db])
    assert bad.exit_code != 0 and "exactly twice" in bad.output
    both = runner.invoke(cli, ["report", "journey", "--db", db])
    assert both.exit_code != 0 and "--prompt ID or --text" in both.output
    index = (tmp_path / "reports" / "index.html").read_text(encoding="utf-8")
    assert all(name in index for name in ("journey-2.html", "compare-1-2.html", "run-1.html"))
    con = duckdb.connect(db)  # a run that stored nothing (it failed at once, or an older server kept an empty run)
    con.execute("INSERT INTO runs (id, started_at, status, pipeline) VALUES (2, now(), 'failed', 'ingest')")
    con.close()
    empty = forked_geomap("report", "run", "--run", "2", "--db", db)
    assert empty.status == 2 and empty.stderr.startswith("error: Run 2 stored no prompts"), empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1


def _store_bytes(db: Path) -> str:
    """sha256 over the store's file, its WAL and every file in the folders beside it."""
    import hashlib

    h = hashlib.sha256()
    for top in sorted(dict.fromkeys([*db.parent.glob(db.name + "*"), *db.parent.glob(db.stem + ".*")])):
        for path in [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(db.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_rendering_a_journey_page_writes_nothing_to_the_store(reports, tmp_path):
    """Once its preconditions hold, a page renders from a read-only store and leaves every byte of it as it was."""
    import duckdb

    from geomap.store.handle import Store

    _, db, _, _ = reports
    before = _store_bytes(db)
    with Store.open(db, "r") as store:
        for pid in (1, 4):  # 1 has a generation, whose step pages are written too
            report = journey_report(store, pid, out=tmp_path / f"journey-{pid}.html")
            assert report.path.exists() and "<html" in report.html
        with pytest.raises(duckdb.Error, match="read-only"):  # the handle really is read-only
            store.cursor().execute("CREATE TABLE probe (a INTEGER)")
    assert _store_bytes(db) == before


OUTSIDE = """() => {  // every SVG label drawn inside its chart: none clipped by the chart's edge
  const out = [];
  for (const svg of document.querySelectorAll('svg')) {
    const box = svg.getBoundingClientRect();
    if (!box.width || !box.height) continue;  // a chart not shown (another tab, a closed panel)
    for (const t of svg.querySelectorAll('text')) {
      const r = t.getBoundingClientRect();
      if (!r.width) continue;
      if (r.top < box.top - 1 || r.bottom > box.bottom + 1 || r.left < box.left - 1 || r.right > box.right + 1)
        out.push(`${t.textContent.trim()} (${svg.getAttribute('aria-label') || svg.id || 'svg'})`);
    }
  }
  return out;
}"""


@pytest.mark.browser
def test_in_chromium_every_chart_label_is_inside_its_chart(reports, browser):
    from geomap.report.api import compare_report, run_report

    model, db, pages, _ = reports
    folder = pages[1].path.parent
    paths = [pages[1].path, pages[4].path, run_report(db, 1, out=folder / "run-1.html", loaded=model).path,
             compare_report(db, 1, 2, out=folder / "compare-1-2.html", loaded=model).path]
    for path in paths:
        page, _ = open_page(browser, path)
        assert page.evaluate(OUTSIDE) == [], path.name
        page.close()

"""The journey page's pictures and controls, operated in Debian's Chromium and checked against the store and against
transformers: layer picker, head grid, decoding controls (exact at every temperature), seeded sampling, map hover,
the layer diagram's boxes; the element budget of a long prompt's page; docs/journey.md's map of the itinerary."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from geomap.analysis.decoding import Strategy
from geomap.capture import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.ingest.generation import generate
from geomap.report.api import journey_report
from geomap.report.data import ELEMENT_BUDGET
from geomap.store.writer import PromptSpec
from tests.report.test_reports import CHROMIUM, open_page, parse
from tests.storedb import rows

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The storm is getting", "The market is", "Paris is the capital of"]
@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


GRID = [(t, k, p) for t in (0.1, 0.35, 1.0, 2.5, 5.0) for k, p in ((0, 1.0), (5, 1.0), (0, 0.9), (0, 0.5), (40, 0.95))]


@pytest.fixture(params=["llama", pytest.param("real", marks=pytest.mark.real)], scope="module")
def journey(request, tiny_models, tmp_path_factory):
    model = request.getfixturevalue("real") if request.param == "real" else tiny_models[request.param]
    folder = tmp_path_factory.mktemp(f"controls-{request.param}")
    db = folder / "c.duckdb"
    ingest(model, [PromptSpec(t) for t in PROMPTS], db, CaptureConfig(attn_positions="all", lens_positions="all"),
           progress=False)
    generate(db, model, PROMPTS[0], 2, Strategy())
    report = journey_report(db, 1, out=folder / "reports" / "journey-1.html", loaded=model)
    return model, db, report


def _final_logits(db) -> np.ndarray:
    """The last position's full logits of prompt 1, through the store's one reader (their layout is its business)."""
    import duckdb

    from geomap.store.query import final_logits

    con = duckdb.connect(str(db), read_only=True)
    try:
        return np.asarray(final_logits(con, 1), np.float32)
    finally:
        con.close()


def _transformers_probs(logits: np.ndarray, t: float, k: int, p: float) -> np.ndarray:
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.as_tensor(logits, dtype=torch.float32)[None]
    scores = TemperatureLogitsWarper(t)(None, scores)
    if k:
        scores = TopKLogitsWarper(k)(None, scores)
    if p < 1:
        scores = TopPLogitsWarper(p)(None, scores)
    return torch.softmax(scores.double(), -1)[0].numpy()


@pytest.mark.browser
def test_decoding_is_exact_at_every_temperature(journey, browser):
    """The page's summary of the full distribution matches transformers' warpers within 1e-3 for T in [0.1, 5]."""
    _, db, report = journey
    logits = _final_logits(db)
    order = np.argsort(-logits, kind="stable")
    page, events = open_page(browser, report.path)
    for t, k, p in GRID:
        shown = page.evaluate("([t, k, p]) => geomapDecode(t, k, p)", [t, k, p])
        want = _transformers_probs(logits, t, k, p)
        got = np.asarray(shown["probs"][:50])
        np.testing.assert_allclose(got, want[order[:50]], atol=1e-3, err_msg=f"T={t} k={k} p={p}")
        assert abs(shown["kept"] - int((want > 0).sum())) <= max(2, 0.002 * len(logits)), (t, k, p)
    assert events["console"] == [] and all(u.startswith("file://") for u in events["requests"])
    page.close()


@pytest.mark.browser
def test_every_control_shows_the_stores_numbers(journey, browser):
    model, db, report = journey
    n = rows(db, "SELECT n_tokens FROM prompts WHERE id = 1")[0][0]
    page, events = open_page(browser, report.path)
    # Layer picker: the diagram's numbers follow the layer.
    for layer in (0, model.anatomy.n_layers - 1):
        page.fill("[data-layer-pick]", str(layer))
        page.locator("[data-layer-pick]").dispatch_event("input")
        attn = rows(db, "SELECT attn_norm FROM contributions WHERE prompt_id = 1 AND pos = ? AND layer = ?",
                    n - 1, layer)[0][0]
        shown = page.locator("[data-bind=attn_norm]").first.get_attribute("data-value")
        assert np.isclose(float(shown), attn, rtol=1e-5), (layer, shown, attn)
        scale = rows(db, "SELECT scale FROM norms WHERE prompt_id = 1 AND pos = ? AND layer = ? AND norm = 0",
                     n - 1, layer)[0][0]
        assert np.isclose(float(page.locator("[data-bind='norms.0.scale']").first.get_attribute("data-value")),
                          scale, rtol=1e-5)
        assert page.locator("[data-layer-out]").text_content() == str(layer)
    # The diagram's boxes open their matrices; the MLP box lists neurons with the tokens they push.
    page.click("[data-box=mlp]")
    info = page.locator("[data-box-info=mlp]")
    assert info.is_visible() and info.locator("table.matrices tr").count() >= 3
    assert page.locator("[data-neurons] tr").count() > 1
    # Head grid: the chosen head's weights are the store's attention row; the causal matrix has one cell per pair.
    layer, head = model.anatomy.n_layers - 1, model.anatomy.n_heads - 1
    page.click(f"[data-head='{layer}.{head}']")
    weights = rows(db, "SELECT weights FROM attention WHERE prompt_id = 1 AND pos = ? AND layer = ? AND head = ?",
                   n - 1, layer, head)[0][0]
    shown = [float(v) for v in page.locator("[data-keys] tr[data-row=w] .num").evaluate_all(
        "els => els.map(e => e.getAttribute('data-value'))")]
    np.testing.assert_allclose(shown, weights[:n], rtol=1e-4, atol=1e-6)
    scores = rows(db, "SELECT scores FROM attention WHERE prompt_id = 1 AND pos = ? AND layer = ? AND head = ?",
                  n - 1, layer, head)[0][0]
    shown = [float(v) for v in page.locator("[data-keys] tr[data-row=score] .num").evaluate_all(
        "els => els.map(e => e.getAttribute('data-value'))")]
    np.testing.assert_allclose(shown, scores[:n], rtol=1e-4, atol=1e-5)
    assert page.locator("[data-bind='head.layer']").text_content() == str(layer)
    assert page.locator("[data-matrix] rect").count() == n * (n + 1) // 2
    # Decoding: T = 2.5 equals transformers; invalid top-k / top-p are refused; the sample is seeded and shown.
    logits = _final_logits(db)
    page.fill("input[name=temperature]", "2.5")
    page.locator("input[name=temperature]").dispatch_event("input")
    want = _transformers_probs(logits, 2.5, 0, 1.0)
    first = float(page.locator("[data-dist] tr[data-rank='1'] td.p").get_attribute("data-value"))
    assert abs(first - want.max()) < 1e-3, (first, want.max())
    assert "2.50" in page.locator("[data-decision]").text_content()
    kept_before = page.locator("[data-dist] tr.kept").count()
    for name, bad in (("top_k", "-4"), ("top_k", "2.5"), ("top_p", "0"), ("top_p", "1.5")):
        page.fill(f"input[name={name}]", bad)
        page.locator(f"input[name={name}]").dispatch_event("input")
        assert page.locator(f"[data-invalid={name}]").is_visible(), (name, bad)
        assert page.locator(f"input[name={name}]").evaluate("e => !e.checkValidity()")
        assert page.locator("[data-dist] tr.kept").count() == kept_before
        page.fill(f"input[name={name}]", "0" if name == "top_k" else "1")
        page.locator(f"input[name={name}]").dispatch_event("input")
        assert not page.locator(f"[data-invalid={name}]").is_visible()
    page.fill("input[name=top_k]", "3")
    page.locator("input[name=top_k]").dispatch_event("input")
    assert page.locator("[data-dist] tr.kept").count() == 3
    assert "top-k 3" in page.locator("[data-decision]").text_content()
    page.fill("input[name=seed]", "7")
    page.click("[data-sample]")
    first_draw = page.locator("[data-dist] tr.drawn").get_attribute("data-rank")
    assert first_draw in ("1", "2", "3") and "seed 7" in page.locator("[data-decision]").text_content()
    assert page.locator("input[name=seed]").input_value() == "8"
    expected = page.evaluate("() => geomapDraw(2.5, 3, 1, 7).rank + 1")
    assert int(first_draw) == expected
    # Map hover names the boundary and the lens's reading there.
    page.locator("[data-map] circle.step[data-layer='0']").first.hover()
    assert re.match(r"boundary 0: the lens reads", page.locator("[data-map-info]").text_content())
    assert events["console"] == [] and all(u.startswith("file://") for u in events["requests"])
    page.close()


def test_docs_map_every_step_to_its_picture(journey):
    """docs/journey.md names, for every itinerary step, the section whose picture shows it; the page agrees."""
    _, _, report = journey
    table = re.findall(r"^\| (\d+) \|.*?\| `#([a-z-]+)` \|$", (ROOT / "docs" / "journey.md").read_text(), re.M)
    assert [int(s) for s, _ in table] == list(range(1, 18))
    page = parse(report.html)
    where = {step: section for section, _, _, step in page.numbers if step}
    for step, section in table:
        assert where.get(step) == section, (step, section, where.get(step))
        assert f'id="{section}"' in report.html
    # the first screen links each step to the same section
    first_screen = report.html.split('id="summary"')[1].split("</ol>")[0]
    links = re.findall(r'<li value="(\d+)"><a href="#([a-z-]+)">', first_screen)
    assert links == table


def test_layer_boxes_follow_the_architecture(tiny_models, tmp_path):
    import json

    from geomap.models.weights_slice import write_slice
    from geomap.report.layer_view import layer_boxes

    for arch, model in tiny_models.items():
        meta = json.loads((write_slice(model, tmp_path / arch) / "meta.json").read_text(encoding="utf-8"))
        boxes = layer_boxes(meta)
        keys = [b["key"] for b in boxes]
        gemma = arch == "gemma3_text"
        assert ("norm_attn_out" in keys) == gemma and ("norm_mlp_out" in keys) == gemma, (arch, keys)
        params = dict(model.anatomy.layers[0].named_parameters())
        for b in boxes:
            for m in b["matrices"]:
                assert m["shape"] == " × ".join(str(s) for s in params[m["name"]].shape), (arch, m)
        labels = {m["label"] for b in boxes for m in b["matrices"]}
        assert {"W_Q", "W_K", "W_V", "W_O"} <= labels or "W_Q|W_K|W_V" in labels, (arch, labels)
        if gemma:
            assert {"q norm", "k norm"} <= labels
            shorts = {m["short"] for b in boxes for m in b["matrices"] if not m["bias"]}
            assert {"q norm", "k norm"} <= shorts and not {"q", "k"} & shorts  # the diagram's q strip is q_norm's w


@pytest.mark.browser
def test_a_long_prompt_is_windowed(tiny_models, browser, tmp_path, monkeypatch):
    """Every per-position table is bounded by its window (shrunk here to fit the tiny model's 64 positions)."""
    from geomap.report import data, head_view

    monkeypatch.setattr(data, "TOKEN_WINDOW", 12)
    monkeypatch.setattr(data, "HEAT_WINDOW", 6)
    monkeypatch.setattr(head_view, "KEY_WINDOW", 8)
    monkeypatch.setattr(head_view, "MATRIX_WINDOW", 5)
    model = tiny_models["llama"]
    db = tmp_path / "long.duckdb"
    ingest(model, [PromptSpec(" ".join(["The storm is coming"] * 8))], db,
           CaptureConfig(attn_positions="all", lens_positions="all"), progress=False)
    n = rows(db, "SELECT n_tokens FROM prompts WHERE id = 1")[0][0]
    assert n > 40
    report = journey_report(db, 1, out=tmp_path / "reports" / "journey-1.html", loaded=model)
    page, events = open_page(browser, report.path)
    assert page.locator("table.tokens tr").count() == 12 + 1
    assert page.locator("[data-keys] tr[data-row=w] .num").count() == 8
    assert page.locator("[data-matrix] rect").count() == 5 * 6 // 2
    heads = model.anatomy.n_layers * model.anatomy.n_heads
    assert page.locator("[data-heat-table=weights] td[style]").count() == heads * 6
    # the weight of the keys left out is shown, and the shown ones plus it sum to 1
    shown = [float(v) for v in page.locator("[data-keys] tr[data-row=w] .num").evaluate_all(
        "els => els.map(e => e.getAttribute('data-value'))")]
    rest = float(page.locator("[data-keys] [data-rest]").text_content())
    assert abs(sum(shown) + rest - 1) < 2e-3
    assert "left out of every per-position table" in page.locator("#tokenization").text_content()
    assert events["console"] == []
    page.close()


@pytest.mark.real
@pytest.mark.browser
def test_a_long_prompt_stays_under_the_element_budget(real, browser, tmp_path):
    """A 1,000-token prompt stored with ingest's defaults: its page stays under the documented element budget."""
    text = " ".join(["After the heavy rain the river rose over the old stone bridge and the town waited."] * 60)
    db = tmp_path / "long.duckdb"
    ingest(real, [PromptSpec(text)], db, CaptureConfig(), progress=False)
    assert rows(db, "SELECT n_tokens FROM prompts WHERE id = 1")[0][0] > 1000
    report = journey_report(db, 1, out=tmp_path / "reports" / "journey-1.html", loaded=real)
    assert report.path.stat().st_size < 1_000_000
    page, events = open_page(browser, report.path)
    count = page.evaluate("document.getElementsByTagName('*').length")
    assert count < ELEMENT_BUDGET, count
    assert events["console"] == []
    page.close()


def test_pipeline_continuation_tokens(tiny_dirs, tmp_path):
    from click.testing import CliRunner

    from geomap.cli import cli

    (tmp_path / "p.txt").write_text("The storm is\n", encoding="utf-8")
    toml = (f'name = "tiny"\nmodel = "{tiny_dirs["llama"]}"\nstore = "{tmp_path / "s.duckdb"}"\n'
            f'reports = "{tmp_path / "reports"}"\ncontinuation_tokens = {{n}}\n[capture]\nattn_positions = "all"\n'
            '[[sources]]\npath = "p.txt"\n')
    (tmp_path / "bad.toml").write_text(toml.replace("{n}", "-1"), encoding="utf-8")
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "geomap", "run", str(tmp_path / "bad.toml")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "continuation_tokens" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.duckdb").exists()
    (tmp_path / "tiny.toml").write_text(toml.replace("{n}", "2"), encoding="utf-8")
    done = CliRunner().invoke(cli, ["run", str(tmp_path / "tiny.toml")])
    assert done.exit_code == 0, done.output
    steps = rows(tmp_path / "s.duckdb", "SELECT d.prompt_id, d.pos FROM decisions d JOIN prompts p ON p.id = "
                                        "d.prompt_id WHERE p.parent_id = 1 AND d.source = 'generate' ORDER BY d.step")
    assert len(steps) == 2
    page = (tmp_path / "reports" / "journey-1.html").read_text(encoding="utf-8")
    sentence = page.split('class="sentence"')[1].split("</p>")[0]
    for prompt_id, pos in steps:
        assert f'href="journey-{prompt_id}-p{pos}.html"' in sentence
        assert (tmp_path / "reports" / f"journey-{prompt_id}-p{pos}.html").exists()
    again = CliRunner().invoke(cli, ["run", str(tmp_path / "tiny.toml")])
    assert again.exit_code == 0
    assert len(rows(tmp_path / "s.duckdb", "SELECT id FROM prompts WHERE parent_id = 1")) == 1  # reused, not redone

    from tests.forked import geomap
    from tests.serve.test_serve import start_server, stop_server

    proc, _ = start_server(tmp_path / "s.duckdb", tiny_dirs["llama"])  # the same pipeline through a server
    try:
        served = geomap("run", str(tmp_path / "tiny.toml"), "--no-reports")
        assert served.status == 0, served.stderr
        assert "(no run recorded)" in served.stderr and "note:" not in served.stderr  # its continuation is there
        (tmp_path / "p.txt").write_text("The storm is\nThe market is\n", encoding="utf-8")
        served = geomap("run", str(tmp_path / "tiny.toml"), "--no-reports")
        assert served.status == 0, served.stderr
        assert "note: 1 of the pipeline's prompts have no continuation" in served.stderr, served.stderr
    finally:
        stop_server(proc)

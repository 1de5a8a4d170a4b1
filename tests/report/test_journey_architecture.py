"""A journey page shows the architecture it reports on, from the stored weight slice and config, never another
model's labels: q/k norms and RoPE in order, each block's RoPE base, sliding vs global blocks, the weight on
position 0 beside each head, the MLP activation by name, the weights' provenance; one layer numbering; every chart
with axis labels. In real Chromium, on Gemma-3 and on a Llama-family model."""

from __future__ import annotations

import pytest

from geomap.capture import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.report.api import journey_report
from geomap.store.writer import PromptSpec
from tests.report.test_journey_controls import browser  # noqa: F401 - the Chromium fixture
from tests.storedb import rows

PROMPT = "The storm is coming and the river is rising over the old bridge"


@pytest.fixture(params=["gemma3_text", "llama", pytest.param("real", marks=pytest.mark.real)], scope="module")
def page_of(request, tiny_models, tmp_path_factory):
    model = request.getfixturevalue("real") if request.param == "real" else tiny_models[request.param]
    folder = tmp_path_factory.mktemp(f"arch-{request.param}")
    db = folder / "a.duckdb"
    ingest(model, [PromptSpec(PROMPT)], db, CaptureConfig(attn_positions="all", lens_positions="all"),
           progress=False)
    report = journey_report(db, 1, out=folder / "reports" / "journey-1.html")
    return model, db, report


def _open(browser, report):  # noqa: F811
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(report.path.resolve().as_uri())
    return page, errors


def _bases(config) -> dict[str, float]:
    """The RoPE base per kind of block, from the config (transformers 5 keeps them in rope_parameters)."""
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return {"default": float(params["rope_theta"])}
    return {kind: float(p["rope_theta"]) for kind, p in params.items()} if params else {
        "default": float(config.rope_theta)}


@pytest.mark.browser
def test_the_steps_of_attention_follow_the_config(page_of, browser):  # noqa: F811
    model, _, report = page_of
    config = model.anatomy.config
    attn = model.anatomy.attn(0)
    page, errors = _open(browser, report)
    ops = page.locator("[data-qk-ops]").text_content()
    assert (page.locator("[data-op=q_norm]").count() == 1) == hasattr(attn, "q_norm")
    assert (page.locator("[data-op=k_norm]").count() == 1) == hasattr(attn, "k_norm")
    assert page.locator("[data-op=rope]").count() == 1 and "post-RoPE" in ops
    if not hasattr(attn, "q_norm"):
        assert "q_norm" not in ops and "q norm" not in page.locator("#layer").text_content()  # no Gemma labels
    shown = {el.get_attribute("data-rope"): float(el.get_attribute("data-base"))
             for el in page.locator("[data-rope]").all()}
    expected = _bases(config)
    for kind, base in shown.items():
        want = expected.get(kind, expected.get("default"))
        assert base == pytest.approx(want, rel=1e-4), (kind, base, want)
    types = list(getattr(config, "layer_types", None) or [])
    global_blocks = [i for i, t in enumerate(types) if t == "full_attention"]
    marked = sorted(int(el.get_attribute("data-kind-of")) for el in page.locator("[data-layer-kinds] .lk.global").all())
    grid = sorted(int(el.get_attribute("data-kind-of")) for el in page.locator("table.grid td.lk.global").all())
    if len(set(types)) > 1:  # Gemma-3: sliding and global blocks
        assert marked == global_blocks == grid and global_blocks
        assert str(config.sliding_window) in page.locator("[data-layer-kinds]").text_content()
    else:
        assert marked == [] and grid == []
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    name = {"gelu_pytorch_tanh": "GELU (tanh approximation)", "silu": "SiLU"}[activation]
    assert name in page.locator("#layer").text_content()
    assert "Weights:" in page.locator("[data-provenance]").text_content()
    assert errors == []
    page.close()


@pytest.mark.browser
def test_the_weight_on_the_first_token_is_the_stored_one(page_of, browser):  # noqa: F811
    _, db, report = page_of
    n = rows(db, "SELECT n_tokens FROM prompts WHERE id = 1")[0][0]
    stored = {(int(layer), int(head)): w0 for layer, head, w0 in rows(
        db, "SELECT layer, head, weights[1] FROM attention WHERE prompt_id = 1 AND pos = ?", n - 1)}
    page, _ = _open(browser, report)
    cells = page.locator("table.grid td.cell").all()
    assert len(cells) == len(stored)
    for cell in cells:
        layer, head = (int(v) for v in cell.get_attribute("data-head").split("."))
        shown = float(cell.locator("[data-bos]").get_attribute("data-bos"))
        assert shown == pytest.approx(stored[(layer, head)], rel=1e-4, abs=1e-5)
    assert "attention sink" in page.locator("[data-sink]").text_content()
    page.close()


@pytest.mark.browser
def test_one_numbering_and_every_chart_has_axes(page_of, browser):  # noqa: F811
    model, _, report = page_of
    n_layers = model.anatomy.n_layers
    page, _ = _open(browser, report)
    assert f"boundary {n_layers} is the final state" in page.locator("[data-numbering]").text_content()
    lens = [int(r.locator("td").first.text_content()) for r in page.locator("table.lens tr").all()[1:]]
    assert lens == list(range(n_layers + 1))  # boundaries 0 … L
    blocks = [int(t) for t in page.locator("table.layers").last.locator("tr.first td:first-child").all_text_contents()]
    assert blocks == list(range(n_layers))  # blocks 0 … L − 1
    assert page.locator("[data-layer-pick]").get_attribute("max") == str(n_layers - 1)
    assert page.locator("table.lens th").first.text_content() == "boundary"
    charts = page.locator("svg[data-chart], svg[data-map]").all()
    assert len(charts) >= 5
    for chart in charts:
        labels = [t.strip() for t in chart.locator(".axislabel").all_text_contents()]
        assert len(labels) >= 2 and all(labels), (chart.get_attribute("aria-label"), labels)
        assert chart.locator(".ticklabel").count() >= 2
    page.close()


def test_the_store_is_not_written_by_a_report(page_of):
    _, db, _ = page_of
    before = rows(db, "SELECT (SELECT count(*) FROM attributions), (SELECT count(*) FROM rope_angles), "
                      "(SELECT count(*) FROM geometry), (SELECT count(*) FROM projections)")
    journey_report(db, 1, write=False)
    after = rows(db, "SELECT (SELECT count(*) FROM attributions), (SELECT count(*) FROM rope_angles), "
                     "(SELECT count(*) FROM geometry), (SELECT count(*) FROM projections)")
    assert before == after and before[0][:3] == (0, 0, 0)


def test_no_model_is_loaded_for_a_report(page_of, monkeypatch):
    """With the model loaders broken, a report of a stored prompt still renders (it reads the store only)."""
    import geomap.models.loading as loading

    _, db, _ = page_of

    def refuse(*args, **kwargs):
        raise AssertionError("a report loaded a model")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr("geomap.models.load_model", refuse)
    assert "id=\"decoding\"" in journey_report(db, 1, write=False).html


@pytest.mark.browser
def test_a_sampled_token_outside_the_listed_rows_is_named(page_of, browser):  # noqa: F811
    """At a high temperature a draw lands below the table's rows: its row appears, named and highlighted."""
    _, _, report = page_of
    page, errors = _open(browser, report)
    page.locator("[data-controls] input[name=temperature]").fill("5")
    page.locator("[data-controls] input[name=temperature]").dispatch_event("input")
    top = page.evaluate("JSON.parse(document.getElementById('geomap-data').textContent).decoding.top")
    rows = page.locator("[data-dist] tr[data-rank]").count()
    for seed in range(200):
        page.locator("[data-controls] input[name=seed]").fill(str(seed))
        page.click("[data-sample]")
        drawn = page.locator("[data-drawn-row]")
        if drawn.is_visible():
            rank = int(drawn.locator("[data-cell=rank]").text_content())
            if rank <= len(top):
                break
    else:
        pytest.fail("no draw below the listed rows in 200 seeds")
    assert rank > rows and "drawn" in (drawn.get_attribute("class") or "")
    name = drawn.locator("[data-cell=token]").text_content()
    assert name == top[rank - 1]["token"].replace(" ", "␣") or name == top[rank - 1]["token"]
    assert f"rank {rank}" in page.locator("[data-decision]").text_content()
    tail = page.locator("[data-tail] [data-cell=tail]").text_content()
    assert float(tail) > 0  # the tail's mass is drawn as its own bar
    assert errors == []
    page.close()

"""The journey page's drawings, measured in Debian's Chromium against the store: colour strips (one cell per stored
value, coloured by its sign), the block's matrices to scale, labels inside their boxes and apart, the decoding chart
naming any drawn token, the PCA path inside its frame with every point reachable, the neurons' strengths."""

from __future__ import annotations

import numpy as np
import pytest

from geomap.analysis.decoding import Strategy
from geomap.analysis.weights import weights_for
from geomap.capture import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.ingest.generation import generate
from geomap.report.api import journey_report
from geomap.report.layer_view import weak_z
from geomap.report.render import showtok
from geomap.store.writer import PromptSpec
from tests.report.test_journey_controls import browser  # noqa: F401 (the Chromium fixture)
from tests.storedb import rows

PROMPTS = ["The storm is getting", "The market is", "Paris is the capital of", "A cat sat on the mat and"]


@pytest.fixture(params=["llama", pytest.param("real", marks=pytest.mark.real)], scope="module")
def drawn(request, tiny_models, tmp_path_factory):
    model = request.getfixturevalue("real") if request.param == "real" else tiny_models[request.param]
    folder = tmp_path_factory.mktemp(f"drawings-{request.param}")
    db = folder / "d.duckdb"
    ingest(model, [PromptSpec(t) for t in PROMPTS], db, CaptureConfig(attn_positions="all", lens_positions="all"),
           progress=False)
    generate(db, model, PROMPTS[0], 2, Strategy())
    report = journey_report(db, 1, out=folder / "reports" / "journey-1.html", loaded=model)
    return model, db, report


@pytest.fixture
def page(drawn, browser):  # noqa: F811
    _, _, report = drawn
    tab = browser.new_page(viewport={"width": 1440, "height": 1000})
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.goto(report.path.resolve().as_uri())
    yield tab
    assert not errors
    tab.close()


def _data(page) -> dict:
    return page.evaluate("JSON.parse(document.getElementById('geomap-data').textContent)")


def test_strips_have_one_cell_per_stored_value_coloured_by_its_sign(drawn, page):
    model, db, _ = drawn
    data = _data(page)
    strips = data["strips"]
    assert {"embed_row", "start", "q", "resid_in", "attn_update", "mlp_update", "resid_out"} <= set(strips)
    info = rows(db, "SELECT weights_sha256, n_tokens FROM prompts p JOIN runs r ON r.id = p.run_id WHERE p.id = 1")[0]
    last = info[1] - 1
    layer, head = data["head"]["layer"], data["head"]["head"]
    # the drawn numbers are the stored ones
    q = np.asarray(rows(db, "SELECT q FROM attention WHERE prompt_id = 1 AND pos = ? AND layer = ? AND head = ?",
                        last, layer, head)[0][0], np.float32)
    np.testing.assert_allclose(strips["q"]["values"], q, rtol=1e-6)
    state = np.asarray(rows(db, "SELECT vec FROM states WHERE prompt_id = 1 AND pos = ? AND layer = ?",
                            last, layer)[0][0])
    np.testing.assert_allclose(strips["resid_in"]["values"], state, rtol=1e-6)
    token = rows(db, "SELECT token_id FROM tokens WHERE prompt_id = 1 AND pos = ?", last)[0][0]
    np.testing.assert_allclose(strips["embed_row"]["values"], weights_for(db, info[0]).embed[token], rtol=1e-6)
    assert len(strips["q"]["values"]) == model.anatomy.head_dim
    assert len(strips["resid_in"]["values"]) == model.anatomy.d_model
    for name, s in strips.items():
        cells = page.evaluate("""(name) => {
            const c = document.querySelector(`canvas[data-strip=${name}]`), cell = Number(c.dataset.cell);
            const px = c.getContext('2d').getImageData(0, 0, c.width, 1).data, out = [];
            for (let i = 0; i < Number(c.dataset.cells); i++) {
                const o = 4 * (i * cell + Math.floor(cell / 2)); out.push([px[o], px[o + 1], px[o + 2]]);
            }
            return {cells: out, width: c.width, n: Number(c.dataset.cells), cell: cell};
        }""", name)
        assert cells["n"] == s["d"] == len(s["values"]) and cells["width"] == s["d"] * cells["cell"]
        for v, (r, _, b) in zip(s["values"], cells["cells"]):
            if abs(v) > 0.05 * s["top"]:
                assert (r > b) == (v > 0), (name, v, r, b)
            elif v == 0:
                assert r == b == 255
        ticks = page.eval_on_selector_all(f"[data-strip-legend={name}] [data-tick]",
                                          "els => els.map(e => Number(e.dataset.tick))")
        assert ticks[0] == pytest.approx(-s["top"], rel=1e-6) and ticks[-1] == pytest.approx(s["top"], rel=1e-6)
        assert ticks[len(ticks) // 2] == 0


def test_the_blocks_matrices_are_drawn_to_scale(drawn, page):
    model, _, _ = drawn
    mats = page.eval_on_selector_all("svg[data-matrices] g.mat", """els => els.map(g => {
        const r = g.querySelector('rect.m'), s = g.querySelector('rect.slot');
        const box = (e) => { const b = e.getBBox(); return [b.x, b.y, b.x + b.width, b.y + b.height]; };
        return {label: g.dataset.mat, rows: Number(g.dataset.rows), cols: Number(g.dataset.cols),
                w: r.width.baseVal.value, h: r.height.baseVal.value, slot: box(s),
                texts: Array.from(g.querySelectorAll('text')).map(box)};
    })""")
    a = model.anatomy
    by = {m["label"]: m for m in mats}
    assert by["W_Q"]["rows"] == a.d_model and by["W_Q"]["cols"] == a.n_heads * a.head_dim
    assert by["W_O"]["rows"] == a.n_heads * a.head_dim and by["W_O"]["cols"] == a.d_model
    grids = [m for m in mats if m["rows"] > 1]
    assert len(grids) >= 6
    per_unit = [m["w"] * m["h"] / (m["rows"] * m["cols"]) for m in grids]
    assert max(per_unit) / min(per_unit) < 1.01  # areas in proportion to the parameter counts
    for m in grids:
        assert m["w"] / m["h"] == pytest.approx(m["cols"] / m["rows"], rel=0.01)
    for m in mats:  # labels inside their slot, slots apart
        x0, y0, x1, y1 = m["slot"]
        for t in m["texts"]:
            assert x0 - 0.5 <= t[0] and t[2] <= x1 + 0.5 and y0 - 0.5 <= t[1] and t[3] <= y1 + 0.5, (m["label"], t)
    slots = [m["slot"] for m in mats]
    for i, p in enumerate(slots):
        for q in slots[i + 1:]:
            assert not (p[0] < q[2] - 0.5 and q[0] < p[2] - 0.5 and p[1] < q[3] - 0.5 and q[1] < p[3] - 0.5)


def test_no_label_leaves_its_box_in_the_layer_diagram(page):
    out = page.eval_on_selector_all("svg.block g.box", """gs => gs.filter(g => g.querySelector('rect')).map(g => {
        const r = g.querySelector('rect').getBBox();
        return {box: g.dataset.box, rect: [r.x, r.y, r.x + r.width, r.y + r.height],
                texts: Array.from(g.querySelectorAll('text')).map(t => { const b = t.getBBox();
                    return [b.x, b.y, b.x + b.width, b.y + b.height, t.textContent]; })};
    })""")
    assert out
    for g in out:
        x0, y0, x1, y1 = g["rect"]
        for t in g["texts"]:
            assert x0 <= t[0] and t[2] <= x1 and y0 <= t[1] and t[3] <= y1, (g["box"], t)


def test_a_drawn_token_outside_the_listed_ones_is_named(drawn, page):
    _, db, _ = drawn
    sha = rows(db, "SELECT r.weights_sha256 FROM prompts p JOIN runs r ON r.id = p.run_id WHERE p.id = 1")[0][0]
    vocab = dict(rows(db, "SELECT token_id, text FROM vocab WHERE weights_sha256 = ?", sha))
    page.fill("input[name=temperature]", "5")
    page.dispatch_event("input[name=temperature]", "input")
    listed = len(_data(page)["decoding"]["top"])
    for seed in range(200):
        page.fill("input[name=seed]", str(seed))
        page.click("[data-sample]")
        d = page.evaluate(f"geomapNamed(geomapDraw(5, 0, 1, {seed}))")
        if d["rank"] >= 15:
            break
    else:
        pytest.fail("no draw outside the listed rows in 200 seeds at T = 5")
    assert d["token"] == vocab[d["id"]]
    label = page.eval_on_selector("svg[data-dist-chart] [data-drawn] [data-token-label]", "e => e.textContent")
    assert showtok(vocab[d["id"]]).startswith(label.rstrip("…"))
    assert showtok(vocab[d["id"]]) in page.inner_text("[data-decision]")
    assert page.inner_text("[data-drawn-row] [data-cell=token]") == showtok(vocab[d["id"]])
    if d["rank"] >= listed:  # in a bin of the tail: the named token's logit lies in that bin
        logits = np.asarray([v for (v,) in rows(db, "SELECT unnest(logits) FROM final_logits WHERE prompt_id = 1 "
                                                   "ORDER BY chunk")], np.float32)
        order = np.argsort(-logits, kind="stable")
        tail = _data(page)["decoding"]["tail"]
        b = d["bin"]
        start = listed + sum(tail["n"][:b])
        assert d["id"] in set(order[start:start + tail["n"][b]].tolist())
    tail_bar = page.eval_on_selector("svg[data-dist-chart] [data-bar-rank=tail] rect", "e => Number(e.dataset.p)")
    shown = page.eval_on_selector_all("svg[data-dist-chart] g.dbar:not(.tail) rect",
                                      "es => es.map(e => Number(e.dataset.p))")
    assert sum(shown) + tail_bar == pytest.approx(1.0, abs=1e-6)


def _boxes_apart(boxes) -> bool:
    return all(not (p[0] < q[2] and q[0] < p[2] and p[1] < q[3] and q[1] < p[3])
               for i, p in enumerate(boxes) for q in boxes[i + 1:])


def test_maps_keep_their_path_and_labels_inside_and_every_point_reachable(page):
    maps = page.eval_on_selector_all("svg[data-map]", """svgs => svgs.map(svg => {
        const f = svg.querySelector('rect.frame').getBBox();
        const box = (e) => { const b = e.getBBox(); return [b.x, b.y, b.x + b.width, b.y + b.height]; };
        return {frame: [f.x, f.y, f.x + f.width, f.y + f.height],
                labels: Array.from(svg.querySelectorAll('text.utok, text.lnum')).map(box),
                path: Array.from(svg.querySelectorAll('polyline.path'))
                    .flatMap(p => Array.from(p.points).map(q => [q.x, q.y])),
                steps: Array.from(svg.querySelectorAll('circle.step'))
                    .map(c => [c.cx.baseVal.value, c.cy.baseVal.value])};
    })""")
    assert maps
    for m in maps:
        x0, y0, x1, y1 = m["frame"]
        assert all(x0 - 0.1 <= x <= x1 + 0.1 and y0 - 0.1 <= y <= y1 + 0.1 for x, y in m["path"] + m["steps"])
        assert all(x0 <= b[0] and b[2] <= x1 and y0 <= b[1] and b[3] <= y1 for b in m["labels"]), m["labels"]
        assert _boxes_apart(m["labels"])
    for circle in page.query_selector_all("svg[data-map] circle.step"):
        layer = circle.get_attribute("data-layer")
        circle.evaluate("c => c.closest('figure').scrollIntoView({block: 'center'})")
        box = circle.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        assert f"boundary {layer}" in page.inner_text("[data-map-info]")


def test_neurons_show_their_strength_and_flag_little_signal(drawn, page):
    _, db, _ = drawn
    data = _data(page)
    sha = rows(db, "SELECT r.weights_sha256 FROM prompts p JOIN runs r ON r.id = p.run_id WHERE p.id = 1")[0][0]
    weights = weights_for(db, sha)
    weak = weak_z(int(weights.meta["vocab_size"]))
    row = next(r for r in data["layers"] if r.get("neurons"))
    m = row["neurons"][0]
    logits = weights.neuron_logits([(row["layer"], m["neuron"])]).astype(np.float64)[0]
    z = (logits - logits.mean()) / logits.std()
    assert m["strength"] == pytest.approx(float(np.max(z) if m["value"] >= 0 else -np.min(z)), rel=1e-3)
    page.fill("[data-layer-pick]", str(row["layer"]))
    page.dispatch_event("[data-layer-pick]", "input")
    page.click("[data-box=mlp]")
    shown = page.eval_on_selector_all("[data-neurons] tr[data-strength]", """trs => trs.map(tr => ({
        strength: Number(tr.dataset.strength), text: tr.children[2].textContent}))""")
    assert len(shown) == len(row["neurons"])
    for s, n in zip(shown, row["neurons"]):
        assert s["strength"] == pytest.approx(n["strength"], rel=1e-6)
        assert ("little signal" in s["text"]) == (n["strength"] < weak)


def test_the_decoding_chart_caption_describes_its_cut_tokens(page):
    """A cut token's bar has p = 0 after the controls, so no grey bar is ever drawn: the caption promises none."""
    page.fill("input[name=top_k]", "2")
    page.dispatch_event("input[name=top_k]", "input")
    heights = page.eval_on_selector_all("svg[data-dist-chart] g.dbar.cut rect", "es => es.map(e => e.getBBox().height)")
    assert heights and max(heights) == 0
    caption = page.inner_text("figure:has(svg[data-dist-chart]) figcaption")
    assert "grey: cut" not in caption and "empty slot" in caption

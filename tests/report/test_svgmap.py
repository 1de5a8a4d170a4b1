"""Map layout for the reports: labels never overlap, none is lost, the zoom frames the end of the path."""

import numpy as np

from geomap.report import svgmap


def _boxes(labels):
    for s in labels:  # the text, suffix included, fits the reserved box
        assert svgmap.CHAR_W * len(s["label"]) <= s["box"][2] - s["box"][0]
        assert abs(s["box"][0] - s["x"]) < 0.1
    return [s["box"] for s in labels]


def test_labels_do_not_overlap_and_every_token_is_kept():
    rng = np.random.default_rng(0)
    # 60 labels crowded into a corner, as the run's top predictions are on a PCA map
    anchors = [{"sx": float(x), "sy": float(y), "text": f"tok{i}"}
               for i, (x, y) in enumerate(rng.normal([300, 60], 8, size=(60, 2)))]
    shown = svgmap.place_labels(anchors, 420, 320)
    assert sum(len(s["members"]) for s in shown) == len(anchors)
    assert 1 < len(shown) < len(anchors)
    boxes = _boxes(shown)
    for i, a in enumerate(boxes):
        assert 0 <= a[0] and a[2] <= 420 and 0 <= a[1] and a[3] <= 320
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    merged = [s for s in shown if len(s["members"]) > 1]
    assert merged and all(s["label"].endswith(f"& {len(s['members']) - 1} more") for s in merged)


def test_the_first_label_is_never_lost():
    # its anchor is buried under the path's dots: it still shows, and the others join it
    dots = [(0, 0, 420, 320)]
    shown = svgmap.place_labels([{"sx": 200.0, "sy": 150.0, "text": " coming"},
                                 {"sx": 205.0, "sy": 150.0, "text": " over"}], 420, 320, taken=dots)
    assert [s["members"] for s in shown] == [[" coming", " over"]] and shown[0]["label"] == " coming & 1 more"


def test_zoom_frames_the_last_layers():
    # layer 0 far away, the rest crowded: the situation of real residual streams
    path = [{"x": -100.0, "y": 0.0, "layer": 0}] + [{"x": 1 + 0.1 * i, "y": 0.05 * i, "layer": i} for i in range(1, 19)]
    m = {"background": [{"x": 1.0, "y": 0.5, "layer": 18}, {"x": -80.0, "y": 3.0, "layer": 18}], "path": path,
         "tokens": [{"x": 2.0, "y": 0.6, "token": " coming"}, {"x": -90.0, "y": 1.0, "token": " far"}]}
    assert svgmap.needs_zoom(m)
    whole, zoom = svgmap.map_view(m), svgmap.map_view(m, zoom=True)
    assert len(whole["background"]) == 2 and zoom["background"] and len(zoom["background"]) == 1
    assert zoom["hidden"] == 1 and [s["text"] for s in zoom["labels"]] == [" coming"]
    last = zoom["path"][-1]
    assert 0 <= last["sx"] <= 420 and 0 <= last["sy"] <= 320
    spread = np.ptp([p["sx"] for p in zoom["path"][-6:]])
    assert spread > 5 * np.ptp([p["sx"] for p in whole["path"][-6:]])
    assert not svgmap.needs_zoom({"background": [], "path": path[1:], "tokens": []})


def test_palette_colours_the_most_frequent_values():
    colours = svgmap.palette(["a"] * 5 + ["b"] * 3 + [f"x{i}" for i in range(10)], top=2)
    assert colours["a"] != colours["b"] and colours["x0"] == colours["x9"] == "#9aa3ad"

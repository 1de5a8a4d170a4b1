"""geomap bench: the harness runs end to end (on a tiny model here) and reports every figure in its JSON shape.

Speed itself is never asserted in tests; `geomap bench` on the real model measures it (docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from geomap.bench.core import judged, median_ratio, percentile, rounds

NAMES = ["capture vs forward with output_hidden_states", "lens vs same-shape plain matmul",
         "store write vs bare DuckDB insert", "orchestration overhead end to end",
         "ingestion end to end vs forward with output_hidden_states", "SQL fetch of one trajectory, p50",
         "kNN p50 latency at 10k states", "kNN recall@10 at 50k states", "PCA fit on 5k states", "journey report",
         "DuckDB bytes per token per layer (full profile, bfloat16)",
         "FAISS bytes per token per layer (full profile, float32 store)",
         "DuckDB bytes per token per layer (states profile, float32)",
         "store write vs plain fsync'd write of the same bytes", "ingestion vs its FLOP bound",
         "states-only ingestion vs forward with output_hidden_states",
         "steady state: states-only ingestion vs forward with hidden states (segments layout)",
         "fixed cost: FAISS build when the run ends (states profile, segments layout)",
         "fixed cost: FAISS build when the run ends (full profile, segments layout)",
         "ingestion peak memory growth, 100 -> 200 prompts", "ingestion peak memory growth, 200 -> 300 prompts"]


def test_targets_and_rounds():
    assert judged("a", 0.95, "x", ">= 0.90").met and not judged("a", 0.85, "x", ">= 0.90").met
    assert judged("b", 2.0, "ms", "<= 3").met and judged("c", 1.0, "s").met is None
    order = []
    t = rounds({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] * 4 and len(t["a"]) == len(t["b"]) == 3  # interleaved, warm-up excluded
    assert median_ratio([2.0, 4.0, 6.0], [1.0, 1.0, 2.0]) == 3.0 and percentile(list(range(1, 101)), 99) == 99


def test_bench_quick_json_on_a_tiny_model(tiny_dirs, tmp_path):
    got = subprocess.run([sys.executable, "-m", "geomap", "bench", "--quick", "--json", "--model",
                          str(tiny_dirs["llama"]), "--markdown", str(tmp_path / "b.md")],
                         capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-3000:]
    out = json.loads(got.stdout)
    assert {"cpu", "cores", "torch", "duckdb", "faiss"} <= set(out["machine"])
    figures = {f["name"]: f for f in out["figures"]}
    for name in NAMES:
        assert name in figures, (name, sorted(figures))
    for f in out["figures"]:
        assert set(f) == {"name", "value", "unit", "target", "met", "note"}
        assert f["value"] == f["value"] and (f["met"] is None) == (f["target"] is None)
    assert 0 < figures["kNN recall@10 at 50k states"]["value"] <= 1
    if importlib.util.find_spec("ray") is not None:  # the Ray engine beside inline, on the same prompts
        for name in ("Ray local (2 workers) vs inline, steady state", "Ray local (2 workers) vs inline, whole run"):
            assert figures[name]["value"] > 0
    assert figures["capture vs forward with output_hidden_states"]["value"] > 0
    table = (tmp_path / "b.md").read_text(encoding="utf-8")
    assert "geomap bench --quick --model" in table and "| lens vs same-shape plain matmul |" in table


def test_bench_segments_json_on_a_tiny_model(tiny_dirs, tmp_path):
    got = subprocess.run([sys.executable, "-m", "geomap", "bench", "--segments", "3000", "--json", "--model",
                          str(tiny_dirs["llama"])], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-3000:]
    out = json.loads(got.stdout)
    figures = {f["name"]: f for f in out["figures"]}
    for name in ("segments store: SQL fetch of one trajectory, p50", "segments store: kNN p50 on one layer's index",
                 "segments store: kNN recall@10", "segments store: journey report"):
        assert figures[name]["value"] > 0 and figures[name]["met"] is not None, name
    assert figures["segments store: kNN recall@10"]["value"] <= 1
    assert out["command"] == f"geomap bench --segments 3000 --model {tiny_dirs['llama']}"
    segments = int(figures["segments store: journey report"]["note"].split(" states in ")[1].split()[0])
    assert segments >= 2  # one states segment per synthetic batch of 8 prompts, beside the real prompts' one


def test_bench_only_interventions(tiny_dirs, tmp_path):
    """`geomap bench --quick --only interventions`: the sweep against its bare forwards, and its storage, alone."""
    got = subprocess.run([sys.executable, "-m", "geomap", "bench", "--quick", "--only", "interventions", "--json",
                          "--model", str(tiny_dirs["llama"])], capture_output=True, text=True, timeout=900,
                         cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-3000:]
    out = json.loads(got.stdout)
    figures = {f["name"]: f for f in out["figures"]}
    assert set(figures) == {"intervene: causal-trace sweep vs its bare forwards",
                            "intervene: edits and reads through hooks vs bare forwards",
                            "intervene: lens rows per intervention", "intervene: storage per intervention",
                            "intervene: storage per intervention vs a full journey"}
    assert figures["intervene: causal-trace sweep vs its bare forwards"]["target"] == ">= 0.80"
    n_bounds = json.loads((tiny_dirs["llama"] / "config.json").read_text())["num_hidden_layers"] + 1
    assert 0 < figures["intervene: lens rows per intervention"]["value"] < n_bounds  # reference rows are reused
    assert 0 < figures["intervene: storage per intervention vs a full journey"]["value"] < 1
    assert out["command"].startswith("geomap bench --quick --only interventions")

"""``geomap bench --load`` runs end to end on a tiny store: its own loopback server, every phase, the soak's checks.

A smoke test of the harness, not a timed test: figures are measured by the benchmark itself.
"""

from __future__ import annotations

from geomap.bench import load_bench, soak_bench


def test_load_and_soak_on_a_tiny_store(tiny_dirs, tmp_path):
    model = str(tiny_dirs["llama"])
    db = load_bench.build_store(tmp_path / "l.duckdb", model, 12, say=lambda line: None)
    said = []
    phases = load_bench.run_load(db, model, clients=(1, 3), seconds=1.5, job_prompts=4, say=said.append, rounds=2)
    assert [(p.name, p.clients) for p in phases] == [("idle", 1), ("idle", 3), ("job (4 prompts)", 1),
                                                    ("job (4 prompts)", 3)]
    for p in phases:
        assert p.errors == [] and p.refused == 0, p.row()
        assert all(p.latencies[k] for k in load_bench.KINDS), p.row()
    assert sum("round" in line for line in said) == 2  # the idle phases ran as two interleaved rounds
    assert all(1.4 <= p.seconds <= 4 for p in phases[:2]), [p.seconds for p in phases[:2]]
    table = load_bench.as_markdown(phases)
    assert table.count("\n") == 7 and "| 3 | idle |" in table
    assert "Idle throughput against 1 client(s), interleaved rounds: 3 clients " in table
    report = soak_bench.run_soak(db, model, 0.2, clients=2, job_prompts=3, say=lambda line: None)
    assert report["ok"], report
    assert report["jobs"] >= 1 and report["stored_once"]["duplicate_states"] == 0
    assert 0 < report["duckdb_peak_mb"] <= report["duckdb_limit_mb"] * 1.02, report
    assert all(rss > duck > 0 for _, rss, duck in report["rss_samples"]), report["rss_samples"]

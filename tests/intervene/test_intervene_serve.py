"""Intervention sweeps as HTTP jobs: through the server's one job queue, validated like a pipeline's tables."""

from __future__ import annotations

from tests.serve.test_serve import Api, start_server, stop_server


def test_a_job_runs_its_sweep_after_its_prompts_and_bad_sweeps_are_422(tiny_dirs, tmp_path):
    db = tmp_path / "s.duckdb"
    proc, port = start_server(db, tiny_dirs["llama"])
    try:
        api = Api(port)
        sweep = {"operation": "patch", "prompt": "The storm is", "source": "The market is", "layers": [0, 1],
                 "positions": [-1], "targets": [" the"], "name": "http"}
        job = api.ok("POST", "/runs", {"prompts": ["The storm is", "The market is"], "interventions": [sweep]})
        view = api.wait(job["run_id"])["job"]
        assert view["status"] == "done", view
        (done,) = view["progress"]["interventions"]
        assert done["sweep"] == "http" and done["stored"] == 2 and len(done["ids"]) == 2
        rows = api.ok("POST", "/sql", {"sql": "SELECT count(*) FROM effects e JOIN interventions i "
                                              "ON i.id = e.intervention_id WHERE i.sweep = 'http'"})["rows"]
        assert rows == [[2]]
        for bad, words in (({**sweep, "operation": "poke"}, "operation = 'poke'"),
                           ({**sweep, "layer": 3}, "unknown key 'layer'")):
            status, got = api.call("POST", "/runs", {"prompts": ["x"], "interventions": [bad]})
            assert status == 422 and words in got["detail"], got
    finally:
        log = stop_server(proc)
    assert "Traceback" not in log, log

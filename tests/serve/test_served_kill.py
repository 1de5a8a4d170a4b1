"""A server killed in the middle of a job: once restarted, the same job submitted again finishes the killed run under
its own id (as a rerun of `geomap ingest` without a server does), and the jobs it had queued record no run."""

from __future__ import annotations

import duckdb

from tests.serve.test_serve import Api, start_server, stop_server

PROMPTS = [f"Prompt {i}: the storm is close" for i in range(6)]


def _runs(db) -> tuple[list[tuple], list[tuple]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        runs = con.execute("SELECT id, status FROM runs ORDER BY id").fetchall()
        prompts = con.execute("SELECT run_id, count(*) FROM prompts GROUP BY run_id ORDER BY run_id").fetchall()
    finally:
        con.close()
    return runs, prompts


def test_a_job_rerun_after_the_server_was_killed_finishes_the_killed_run(tiny_dirs, tmp_path):
    db, model = tmp_path / "s.duckdb", tiny_dirs["llama"]
    job = {"prompts": PROMPTS, "batch_size": 2}
    proc, port = start_server(db, model, env={"GEOMAP_KILL_AT": "batch.committed@2"})
    try:
        api = Api(port)
        assert api.ok("POST", "/runs", job)["run_id"] == 1
        assert api.ok("POST", "/runs", {"prompts": ["Another prompt"]})["run_id"] == 2  # queued behind it
        assert proc.wait(timeout=300) == -9  # killed in the first job, after its second batch
    finally:
        stop_server(proc)
    runs, prompts = _runs(db)
    assert runs == [(1, "running"), (2, "queued")] and prompts == [(1, 4)]
    proc, port = start_server(db, model)
    try:
        api = Api(port)
        again = api.ok("POST", "/runs", job)
        done = api.wait(again["run_id"])
        assert done["job"]["status"] == "done", done
        assert done["job"]["progress"]["run_id"] == 1 and done["job"]["progress"]["stored"] == 2
    finally:
        stop_server(proc)
    assert _runs(db) == ([(1, "done")], [(1, 6)])  # as one uninterrupted job: one run, every prompt in it

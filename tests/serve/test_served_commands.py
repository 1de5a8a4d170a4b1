"""A served store serves every command: each store command either works through the running server, or ends with
one line naming geomap's own server (its URL and pid) and what to do. Never "locked by process N, which is
writing to it" for a server that sits idle."""

from __future__ import annotations

import pytest

from tests.forked import geomap
from tests.serve.test_serve import Api, start_server, stop_server


@pytest.fixture(scope="module")
def served(tiny_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    db = folder / "s.duckdb"
    (folder / "p.txt").write_text("The storm is\nThe market is\n")
    done = geomap("ingest", str(folder / "p.txt"), "--db", str(db), "--model", str(tiny_dirs["llama"]))
    assert done.status == 0, done.stderr
    proc, port = start_server(db, tiny_dirs["llama"])
    Api(port).ok("GET", "/healthz")
    yield db, folder, proc, port, tiny_dirs["llama"]
    stop_server(proc)


# Through the server: these answer.
THROUGH = [
    ["sql", "SELECT count(*) AS n FROM prompts"],
    ["neighbors", "--prompt", "1", "--layer", "1", "-k", "2"],
    ["report", "run", "--run", "1", "--out", "{folder}/r/run-1.html"],
]
# Need the store's file: one line naming the server.
NAMED = [
    ["stats", "--prompt", "1"],
    ["decode", "--prompt", "1"],
    ["attribute", "--prompt", "1"],
    ["position", "--prompt", "1"],
    ["index", "verify"],
    ["index", "rebuild"],
    ["export", "prompts", "--out", "{folder}/p.parquet"],
    ["geometry", "--prompt", "1"],
    ["project", "--run", "1"],
    ["tuned-lens", "--run", "1", "--steps", "1"],
    ["store", "compact"],
    ["generate", "The storm is", "--max-new-tokens", "1", "--model", "{model}"],
    ["intervene", "steer", "The storm is", "--model", "{model}", "--layer", "1", "--alpha", "0",
     "--tokens", "a", "b"],
]


@pytest.mark.parametrize("args", THROUGH, ids=[" ".join(a[:2]) for a in THROUGH])
def test_commands_go_through_the_server(served, args):
    db, folder, _, port, model = served
    done = geomap(*[a.format(folder=folder, model=model) for a in args], "--db", str(db))
    assert done.status == 0, done.stderr
    assert f"127.0.0.1:{port}" in done.stderr  # it said it went through the server


@pytest.mark.parametrize("args", NAMED, ids=[" ".join(a[:2]) for a in NAMED])
def test_other_commands_name_the_server(served, args):
    db, folder, proc, port, model = served
    done = geomap(*[a.format(folder=folder, model=model) for a in args], "--db", str(db))
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("geomap serve owns")]
    assert done.status == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, lines
    assert "geomap's own server" in lines[0] and f"pid {proc.pid}" in lines[0] and str(port) in lines[0], lines[0]
    assert "writing to it" not in lines[0]


def test_a_rerun_through_the_server_records_no_empty_run(served):
    db, folder, _, port, model = served
    api = Api(port)
    last = api.ok("POST", "/sql", {"sql": "SELECT max(id) FROM runs"})["rows"][0][0]
    done = geomap("ingest", str(folder / "p.txt"), "--db", str(db), "--model", str(model))
    assert done.status == 0, done.stderr
    assert "no prompts to store: all 2 are stored already (no run recorded)" in done.stderr, done.stderr
    assert api.ok("POST", "/sql", {"sql": "SELECT count(*) FROM runs WHERE id > ?", "params": [last]})["rows"] == [[0]]
    state = api.ok("GET", f"/runs/{last + 1}")  # the job that found nothing to do still answers under its id
    assert state["job"]["status"] == "done" and state["job"]["progress"]["recorded"] is False
    job = api.ok("POST", "/runs", {"prompts": ["A prompt not stored yet"], "model": str(model)})
    assert job["run_id"] == last + 2  # the dropped id is not handed out again while a client may ask about it
    assert api.wait(job["run_id"])["status"] == "done"


def test_bad_input_through_the_server_records_no_run(served):
    db, folder, _, port, model = served
    api = Api(port)
    last = api.ok("POST", "/sql", {"sql": "SELECT max(id) FROM runs"})["rows"][0][0]
    (folder / "new.txt").write_text("A prompt the store does not hold\n")
    done = geomap("ingest", str(folder / "new.txt"), "--db", str(db), "--model", str(model), "--layers", "99")
    assert done.status == 2, done.stderr
    errors = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr and "layers [99]" in errors[0], done.stderr
    assert api.ok("POST", "/sql", {"sql": "SELECT count(*) FROM runs WHERE id > ?", "params": [last]})["rows"] == [[0]]
    state = api.ok("GET", f"/runs/{last + 1}")  # the refused job still answers under its id
    assert state["job"]["status"] == "failed" and "layers [99]" in state["job"]["error"]

"""geomap serve: a real uvicorn server in its own process, on a loopback port, spoken to over HTTP."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.tiny import ARCHS  # noqa: F401 - the tiny model directories come from conftest's tiny_dirs

PROMPTS = [f"Prompt number {i} says the weather is {w}" for i, w in
           enumerate(["cold", "warm", "grey", "wet", "dry", "clear"] * 10)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    """A tiny HTTP client that can also send raw bodies and headers."""

    def __init__(self, port: int, token: str | None = None):
        self.port, self.token = port, token

    def call(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=float(os.environ.get("API_TIMEOUT", "120")))
        head = {"content-type": "application/json", **(headers or {})}
        if self.token:
            head.setdefault("authorization", f"Bearer {self.token}")
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=head)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8")
        conn.close()
        kind = resp.getheader("content-type", "")
        return resp.status, (json.loads(text) if "json" in kind else text)

    def ok(self, method: str, path: str, body=None):
        status, got = self.call(method, path, body)
        assert status < 300, (status, got)
        return got

    def wait(self, run_id: int, timeout: float = 300) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            state = self.ok("GET", f"/runs/{run_id}")
            if state["job"]["status"] in ("done", "failed"):
                return state
            time.sleep(0.2)
        raise TimeoutError(run_id)


def start_server(db: Path, model_dir: Path, *extra: str, env: dict | None = None):
    port = _port()
    cmd = [sys.executable, "-m", "geomap", "serve", "--db", str(db), "--port", str(port), "--model", str(model_dir),
           "--pipelines", str(db.parent), "--max-body", "200000", "--sql-time-limit", "3", *extra]
    log = db.with_name(db.name + f".{port}.log").open("w+")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    proc.log = log
    end = time.time() + 120
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {Path(log.name).read_text()}")
        try:
            if Api(port).call("GET", "/healthz")[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("server did not start")


def stop_server(proc) -> str:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.close()
    out = Path(proc.log.name).read_text()
    if os.environ.get("GEOMAP_SERVER_LOG"):
        Path(os.environ["GEOMAP_SERVER_LOG"]).write_text(out)
    return out


@pytest.fixture(scope="module")
def served(tiny_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    db = folder / "s.duckdb"
    proc, port = start_server(db, tiny_dirs["llama"])
    api = Api(port)
    first = api.ok("POST", "/runs", {"prompts": ["The storm is", "The market is", {"text": "Paris is in",
                                                                                     "tags": ["facts"]}],
                                     "capture": {"attn_positions": "all", "lens_positions": "all"}})
    assert api.wait(first["run_id"])["job"]["status"] == "done"
    yield api, db, tiny_dirs["llama"], proc
    log = stop_server(proc)
    assert "Traceback" not in log, log
    assert '"GET /runs' not in log  # no line per request without --access-log
    assert not (folder / "s.duckdb.serve.json").exists()


def test_access_log_writes_a_line_per_request(tiny_dirs, tmp_path):
    proc, port = start_server(tmp_path / "a.duckdb", tiny_dirs["llama"], "--access-log")
    try:
        assert Api(port).call("GET", "/healthz")[0] == 200
    finally:
        log = stop_server(proc)
    assert '"GET /healthz HTTP/1.1" 200' in log, log


def test_an_ingestion_job_runs_alongside_consistent_queries(served):
    api, _, _, _ = served
    job = api.ok("POST", "/runs", {"prompts": PROMPTS, "batch_size": 2})
    run_id = job["run_id"]
    assert job["status"] in ("queued", "running") and job["url"] == f"/runs/{run_id}"
    check = {"sql": """SELECT (SELECT count(*) FROM prompts WHERE run_id = $r AND status = 'done') AS prompts,
                              (SELECT count(DISTINCT s.prompt_id) FROM states s JOIN prompts p ON p.id = s.prompt_id
                               WHERE p.run_id = $r) AS with_states,
                              (SELECT count(*) FROM tokens t JOIN prompts p ON p.id = t.prompt_id
                               WHERE p.run_id = $r) AS tokens,
                              (SELECT coalesce(sum(n_tokens), 0) FROM prompts WHERE run_id = $r) AS n_tokens""",
             "params": {"r": run_id}}
    seen, progress, errors = [], [], []

    def query():
        while True:
            try:
                status, got = api.call("POST", "/sql", check)
                if status != 200:
                    errors.append((status, got))
                    return
                seen.append(got["rows"][0])
                status, other = api.call("GET", f"/prompts?run_id={run_id}&limit=1000")
                if status != 200:
                    errors.append((status, other))
                state = api.ok("GET", f"/runs/{run_id}")["job"]
                progress.append(state["progress"].get("stored", 0))
                if state["status"] in ("done", "failed"):
                    return
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
                return

    threads = [threading.Thread(target=query) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    final = api.wait(run_id)
    assert final["status"] == "done" and final["job"]["progress"]["stored"] == len(PROMPTS)
    for prompts, with_states, tokens, n_tokens in seen:  # every snapshot is a whole number of stored prompts
        assert prompts == with_states and tokens == n_tokens
    counts = [row[0] for row in seen]
    assert len(set(counts)) >= 2, "the queries never saw the job in progress"
    assert 0 < min(c for c in counts if c) and max(counts) <= len(PROMPTS)
    per_thread_sorted = all(a <= b for a, b in zip(progress, progress[1:])) or len(set(progress)) > 1
    assert per_thread_sorted
    got = api.ok("POST", "/sql", check)["rows"][0]
    assert got[0] == len(PROMPTS) == got[1]
    # DuckDB and FAISS agree once the job is done
    rows = api.ok("POST", "/sql", {"sql": "SELECT count(*) FROM states WHERE layer = 0"})["rows"][0][0]
    hits = api.ok("GET", "/neighbors?prompt_id=1&layer=2&k=3")["neighbors"]
    assert hits[0]["prompt_id"] == 1 and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-4) and rows > 3


def test_sql_is_read_only_locked_down_capped_and_timed(served, tmp_path):
    api, db, _, _ = served
    target = tmp_path / "leak.csv"
    refused = [
        "INSERT INTO runs (id) VALUES (999)",
        "DELETE FROM prompts",
        "CREATE TABLE x AS SELECT 1",
        f"COPY (SELECT 1) TO '{target}'",
        "SELECT * FROM read_csv('/etc/passwd')",
        f"ATTACH '{tmp_path / 'other.duckdb'}' AS other",
        "SET enable_external_access = true",
        "INSTALL httpfs",
        "SELECT 1; DROP TABLE prompts",
        "UPDATE prompts SET text = 'x'",
    ]
    for sql in refused:
        status, got = api.call("POST", "/sql", {"sql": sql})
        assert status == 403 and got["detail"].startswith("Refused"), (sql, status, got)
    assert not target.exists() and not (tmp_path / "other.duckdb").exists()
    status, got = api.call("POST", "/sql", {"sql": "SELEC 1"})
    assert status == 400 and "syntax" in got["detail"].lower()
    got = api.ok("POST", "/sql", {"sql": "SELECT range AS i FROM range(100)", "max_rows": 7})
    assert got["truncated"] and len(got["rows"]) == 7 and got["rows"][0] == [0]
    got = api.ok("POST", "/sql", {"sql": "SELECT 1", "time_limit": 600, "max_rows": 10**6})
    assert got["time_limit"] == 3 and got["max_rows"] == 10_000  # the server's caps win
    status, got = api.call("POST", "/sql", {"sql": "SELECT count(*) FROM range(100000000000) a", "time_limit": 0.5})
    assert status == 408 and "time limit" in got["detail"]
    # the writer is not weakened: a job still stores prompts after all of the above
    job = api.ok("POST", "/runs", {"prompts": ["After the refusals"]})
    assert api.wait(job["run_id"])["job"]["progress"]["stored"] == 1
    assert api.ok("POST", "/sql", {"sql": "SELECT count(*) FROM runs WHERE id = 999"})["rows"] == [[0]]


def test_the_perimeter(served):
    api, _, _, _ = served
    status, got = api.call("GET", "/runs", headers={"host": "evil.example:8000"})
    assert status == 403 and "evil.example" in got["detail"]
    status, got = api.call("POST", "/sql", {"sql": "SELECT 1"}, headers={"origin": "http://evil.example"})
    assert status == 403 and "Cross-origin" in got["detail"]
    assert api.call("GET", "/runs", headers={"host": f"localhost:{api.port}"})[0] == 200
    status, got = api.call("POST", "/sql", raw=b'{"sql": "SELECT 1",')
    assert status == 422 and "malformed JSON" in got["detail"]
    status, got = api.call("POST", "/sql", {"sql": 5})
    assert status == 422 and got["detail"].startswith("Invalid request: sql:")
    status, got = api.call("POST", "/runs", {"prompts": ["x"], "pipeline": "journey"})
    assert status == 422 and "exactly one of" in got["detail"]
    status, got = api.call("POST", "/sql", {"sql": "SELECT '" + "x" * 300_000 + "'"})
    assert status == 413 and "too large" in got["detail"]
    status, got = api.call("POST", "/runs", {"prompts": ["x"], "model": "/etc"})
    assert status == 403 and "does not load model" in got["detail"]
    status, got = api.call("POST", "/runs", {"prompts": ["x"], "engine": {"kind": "ray"}})
    assert status == 403 and "geomap serve --ray" in got["detail"]  # Ray jobs only where the server allows them
    status, got = api.call("POST", "/runs", {"prompts": ["x"], "engine": {"kind": "ray", "address": "10.0.0.5:6379"}})
    assert status == 422 and "address" in got["detail"]  # no cluster address over HTTP
    status, got = api.call("GET", "/reports/../../etc/passwd")
    assert status == 404


def test_a_token_guards_everything_but_health(tiny_dirs, tmp_path):
    proc, port = start_server(tmp_path / "t.duckdb", tiny_dirs["llama"], env={"GEOMAP_TOKEN": "s3cret-token"})
    try:
        status, got = Api(port).call("GET", "/runs")
        assert status == 401 and "bearer token" in got["detail"]
        assert Api(port, "wrong").call("GET", "/runs")[0] == 401
        assert Api(port, "s3cret-token").call("GET", "/runs") == (200, [])
        health = Api(port).ok("GET", "/healthz")
        assert health["status"] == "ok" and health["db"] is None  # the store's path only with the token
        assert Api(port, "s3cret-token").ok("GET", "/healthz")["db"] == str((tmp_path / "t.duckdb").resolve())
        info = json.loads((tmp_path / "t.duckdb.serve.json").read_text())
        assert info["token"] == "s3cret-token" and (tmp_path / "t.duckdb.serve.json").stat().st_mode & 0o077 == 0
    finally:
        stop_server(proc)


def test_binding_beyond_loopback_needs_a_token(tmp_path):
    from geomap.errors import GeomapError
    from geomap.serve.app import Settings
    from geomap.serve.runner import serve
    from geomap.serve.security import host_name, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    assert host_name("[::1]:8000") == "::1" and host_name("http://Evil.Example:80/x") == "evil.example"
    with pytest.raises(GeomapError, match="needs a bearer token"):
        serve(Settings(tmp_path / "x.duckdb", token=""), host="0.0.0.0", port=_port())


def test_prompt_endpoints_match_the_store(served):
    api, _, _, _ = served
    prompt = api.ok("GET", "/prompts/1")
    assert prompt["text"] == "The storm is" and [t["pos"] for t in prompt["tokens"]] == list(range(prompt["n_tokens"]))
    n_layers = api.ok("GET", f"/runs/{prompt['run_id']}")["n_layers"]
    traj = api.ok("GET", "/prompts/1/trajectory")["layers"]
    assert [r["layer"] for r in traj] == list(range(n_layers + 1)) and traj[-1]["final_rank"] == 1
    att = api.ok("GET", "/prompts/1/attention?layer=0&pos=1")
    assert all(abs(sum(h["weights"]) - 1) < 1e-5 and len(h["weights"]) >= 2 for h in att["heads"])
    lens = api.ok("GET", "/prompts/1/lens?top=3")["layers"]
    stored = api.ok("POST", "/sql", {"sql": "SELECT probs[1:3] FROM lens WHERE prompt_id = 1 AND pos = ? "
                                            "ORDER BY layer", "params": [prompt["n_tokens"] - 1]})["rows"]
    assert [r["probs"] for r in lens] == [r[0] for r in stored] and all(len(r["tokens"]) == 3 for r in lens)
    state = api.ok("POST", "/sql", {"sql": "SELECT id FROM states WHERE prompt_id = 2 AND layer = 1 "
                                           "ORDER BY pos DESC LIMIT 1"})["rows"][0][0]
    near = api.ok("GET", f"/neighbors?state_id={state}&k=2")["neighbors"]
    assert near[0]["state_id"] == state
    assert api.call("GET", "/prompts/999999")[0] == 404
    assert api.call("GET", "/prompts/1/trajectory?pos=99")[0] == 404
    assert api.call("GET", "/neighbors?layer=1")[0] == 422
    assert api.call("GET", f"/runs?offset={2**100}")[0] == 422  # found by schemathesis: it used to overflow (500)


def test_reports_are_rendered_by_the_server(served):
    api, _, _, _ = served
    status, page = api.call("GET", "/reports/journey-1.html")
    end = time.time() + 300
    while status == 202 and time.time() < end:  # the run's maps are fitted in the background first
        time.sleep(0.5)
        status, page = api.call("GET", "/reports/journey-1.html")
    assert status == 200 and 'id="trajectory"' in page and "<script src" not in page
    status, page = api.call("GET", "/reports/run-1.html")
    assert status == 200 and 'href="journey-1.html"' in page
    assert api.call("GET", "/reports/compare-1-2.html")[0] == 200
    status, page = api.call("GET", "/reports/index.html")
    assert status == 200 and 'href="journey-3.html"' in page and 'href="run-1.html"' in page
    assert api.call("GET", "/reports/journey-999.html")[0] == 404
    assert api.call("GET", "/reports/secret.txt")[0] == 404


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geomap", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_the_cli_goes_through_a_running_server(served, tmp_path):
    api, db, model_dir, _ = served
    got = _cli("sql", "SELECT count(*) AS n FROM prompts WHERE id = 1", "--db", str(db), "--json", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == [{"n": 1}] and "going through http://127.0.0.1" in got.stderr
    src = tmp_path / "more.txt"
    src.write_text("A prompt from a file\nAnother one\n", encoding="utf-8")
    got = _cli("ingest", str(src), "--db", str(db), "--model", str(model_dir), "--json", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    summary = json.loads(got.stdout)
    assert summary["stored"] == 2
    got = _cli("neighbors", "--prompt", "1", "--layer", "1", "-k", "2", "--db", str(db), "--json", cwd=tmp_path)
    assert got.returncode == 0 and json.loads(got.stdout)[0]["prompt_id"] == 1, got.stderr
    got = _cli("report", "journey", "--prompt", "1", "--db", str(db), cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert 'id="decoding"' in (tmp_path / "reports" / "journey-1.html").read_text(encoding="utf-8")
    assert "journey-1.html" in (tmp_path / "reports" / "index.html").read_text(encoding="utf-8")
    (tmp_path / "p.txt").write_text("Pipeline prompt one\nPipeline prompt two\n", encoding="utf-8")
    pipe = tmp_path / "small.toml"
    pipe.write_text(f'model = "{model_dir}"\nreports = "out"\n[[sources]]\npath = "p.txt"\n', encoding="utf-8")
    got = _cli("run", str(pipe), "--db", str(db), "--json", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout.splitlines()[0])["stored"] == 2
    written = sorted(p.name for p in (tmp_path / "out").glob("*.html"))
    assert "index.html" in written and sum(n.startswith("journey-") for n in written) == 2
    assert any(n.startswith("run-") for n in written)


def test_the_openapi_description_survives_fuzzing(served):
    """A bounded schemathesis run: no request, however odd, makes the server fail (no 5xx)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    api, _, _, _ = served
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{api.port}/openapi.json")
    failures, calls = [], 0
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            nonlocal calls
            response = case.call()
            calls += 1
            if response.status_code >= 500:
                failures.append((case.method, case.formatted_path, case.body, response.status_code, response.text))

        check()
    assert calls > 100
    assert not failures, failures[:3]

"""The server survives its users: memory and time limits of SQL, no file reads, bounded connections, validated
numbers and report requests, cross-site refusals, offline API docs. A real uvicorn on 127.0.0.1, in its own process;
every test bounds its connections and its time."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.serve.test_serve import PROMPTS, Api, start_server, stop_server

BUDGET_MB = 256
HOSTILE = "Escape \x1b]0;pwned\x07 and \x1b[2J clear"


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


@pytest.fixture(scope="module")
def limited(tiny_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("limited")
    db = folder / "l.duckdb"
    proc, port = start_server(db, tiny_dirs["llama"], "--sql-memory", str(BUDGET_MB), "--sql-time-limit", "5")
    api = Api(port)
    first = api.ok("POST", "/runs", {"prompts": ["The storm is", "The market is", HOSTILE]})
    assert api.wait(first["run_id"])["job"]["status"] == "done"
    yield api, db, proc
    log = stop_server(proc)
    assert "Traceback" not in log, log


BOMBS = {
    "range as a list": "SELECT len(range(1e8))",
    "a list of 1e9": "SELECT list(range(1e9))",
    "string_agg of repeats": "SELECT string_agg(repeat('x', 100000), '') FROM range(100000)",
    "string_agg of smaller repeats": "SELECT len(string_agg(repeat('x', 10000) || i, '')) FROM range(1000000) t(i)",
    "list aggregate": "SELECT list(i) FROM range(400000000) t(i)",
    "wide result": "SELECT i, range(2000) AS wide FROM range(1000000) t(i)",
    "wide strings": "SELECT i, repeat('y', 10000) || i AS wide FROM range(1000000) t(i)",
}


def test_memory_bombs_are_refused_while_ingestion_carries_on(limited):
    api, _, proc = limited
    job = api.ok("POST", "/runs", {"prompts": PROMPTS[:24], "batch_size": 2})
    before = _status(proc.pid)
    figures = {}
    for name, sql in BOMBS.items():
        start = time.perf_counter()
        status, got = api.call("POST", "/sql", {"sql": sql, "max_rows": 10_000})
        took = time.perf_counter() - start
        figures[name] = (round(took, 2), round((_status(proc.pid)["VmHWM"] - before["VmRSS"]) / 2**20))
        assert status == 403 and f"needs more than {BUDGET_MB} MB" in got["detail"], (name, status, got)
        assert took < 5 + 1.5, (name, took)  # refused within the time limit
        assert api.ok("GET", "/healthz")["status"] == "ok"
    after = _status(proc.pid)
    growth = after["VmHWM"] - before["VmRSS"]
    print("bombs (seconds, peak growth MB):", figures, "peak growth overall:", growth // 2**20, "MB")
    assert after["VmHWM"] <= max(before["VmHWM"], before["VmRSS"] + (BUDGET_MB + 160) * 2**20), figures
    state = api.wait(job["run_id"])
    assert state["job"]["status"] == "done" and state["job"]["progress"]["stored"] == 24, state
    assert api.ok("POST", "/sql", {"sql": "SELECT count(*) FROM prompts WHERE run_id = ?",
                                   "params": [job["run_id"]]})["rows"] == [[24]]


def test_the_time_limit_holds_and_reports_the_real_time(limited):
    api, _, _ = limited
    start = time.perf_counter()
    status, got = api.call("POST", "/sql", {"sql": "SELECT count(*) FROM range(10000000000000)", "time_limit": 1})
    took = time.perf_counter() - start
    assert status == 408 and "time limit of 1 s" in got["detail"] and "stopped after 1." in got["detail"], got
    assert took < 2.5


def test_no_file_is_readable_not_even_the_stores_own(limited):
    api, db, _ = limited
    for sql in [f"SELECT * FROM read_blob('{db}')", f"SELECT size FROM read_blob('{db}')",
                f"SELECT * FROM read_text('{db}.wal')", f"SELECT * FROM glob('{db}.tmp/*')",
                f"SELECT * FROM glob('{db.parent}/*')", f"FROM '{db}'", "FROM 'l.duckdb'",
                f"SELECT * FROM read_csv('{db}.serve.json')", "SELECT * FROM query('SELECT 1')",
                "SELECT * FROM duckdb_temporary_files()", f"CALL read_text('{db}')",
                f"SELECT (SELECT count(*) FROM read_blob('{db}')) AS n"]:
        status, got = api.call("POST", "/sql", {"sql": sql})
        assert status == 403 and got["detail"].startswith("Refused"), (sql, status, got)
    status, got = api.call("POST", "/sql", {"sql": "FROM '/etc/passwd'"})
    assert status == 403 and "files cannot be read" in got["detail"] and "/etc/passwd" in got["detail"], got


def test_checkpoints_and_other_acts_are_refused_by_their_real_name(limited):
    api, _, _ = limited
    for sql, named in [("CHECKPOINT", "CHECKPOINT"), ("FORCE CHECKPOINT", "FORCE CHECKPOINT"),
                       ("CALL checkpoint()", "checkpoint()"), ("CALL force_checkpoint()", "force_checkpoint()"),
                       ("VACUUM", "VACUUM"), ("/* (a DELETE statement) */ INSERT INTO runs (id) VALUES (9)",
                                              "INSERT (an INSERT statement)"),
                       ("-- DROP\nUPDATE runs SET model = 'x'", "UPDATE (an UPDATE statement)"),
                       ("PRAGMA enable_profiling", "PRAGMA enable_profiling")]:
        status, got = api.call("POST", "/sql", {"sql": sql})
        assert status == 403 and got["detail"].startswith(f"Refused {named}"), (sql, got)
        assert "DELETE" not in got["detail"] and "a INSERT" not in got["detail"]


@pytest.mark.parametrize("raw", ['{"sql": "SELECT 1", "time_limit": NaN}',
                                 '{"sql": "SELECT 1", "time_limit": Infinity}',
                                 '{"sql": "SELECT 1", "time_limit": -Infinity}', '{"sql": "SELECT 1", "time_limit": 0}',
                                 '{"sql": "SELECT 1", "time_limit": -1}', '{"sql": "SELECT 1", "max_rows": 0}',
                                 '{"sql": "SELECT 1", "max_rows": 2.5}', '{"sql": "SELECT 1", "max_rows": NaN}'])
def test_numbers_that_are_not_limits_get_422(limited, raw):
    api, _, _ = limited
    status, got = api.call("POST", "/sql", raw=raw.encode())
    assert status == 422 and got["detail"].startswith("Invalid request:"), got


def test_capture_numbers_are_checked_before_a_run_exists(limited):
    api, _, _ = limited
    runs = api.ok("POST", "/sql", {"sql": "SELECT count(*) FROM runs"})["rows"][0][0]
    for raw in ['{"prompts": ["x"], "capture": {"top_k": NaN}}', '{"prompts": ["x"], "capture": {"top_k": 2.5}}',
                '{"prompts": ["x"], "capture": {"top_k": Infinity}}',
                '{"prompts": ["x"], "capture": {"attn_positions": [1.5]}}']:
        status, got = api.call("POST", "/runs", raw=raw.encode())
        assert status == 422 and "capture" in got["detail"], (raw, got)
    assert api.ok("POST", "/sql", {"sql": "SELECT count(*) FROM runs"})["rows"][0][0] == runs


def test_slow_clients_cannot_starve_health(limited):
    api, _, _ = limited
    held = []
    try:
        for _ in range(70):  # connections that never finish their headers
            s = socket.create_connection(("127.0.0.1", api.port), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            held.append(s)
        end = time.time() + 3
        answered = 0
        while time.time() < end:
            start = time.perf_counter()
            assert api.call("GET", "/healthz")[0] == 200
            assert time.perf_counter() - start < 1.0
            answered += 1
            time.sleep(0.2)
        assert answered >= 5
        assert api.call("GET", "/runs")[0] == 200
        closed = 0
        for s in held:  # the server closed the connections past its idle budget
            s.settimeout(0.05)
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except (TimeoutError, OSError):
                pass
        assert closed >= 70 - 32, closed
    finally:
        for s in held:
            s.close()


def test_oversized_headers_are_refused_and_the_server_carries_on(limited):
    api, _, _ = limited
    for chunks in ([b"X-Big: " + b"a" * 40_000 + b"\r\n"],  # one piece
                   [b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(40)],  # in many headers
                   [b"X-Slow: "] + [b"c" * 1000] * 40):  # one header trickled, never complete
        with socket.create_connection(("127.0.0.1", api.port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            reply = b""
            try:
                for chunk in chunks:
                    s.sendall(chunk)
                s.sendall(b"\r\n")
                while chunk := s.recv(4096):
                    reply += chunk
            except (BrokenPipeError, ConnectionResetError):
                pass
        assert reply.split(b"\r\n", 1)[0] in (b"HTTP/1.1 400 Bad Request", b""), reply[:200]  # b"": reset
    assert api.call("GET", "/healthz")[0] == 200


def test_report_requests_are_validated_before_any_work(limited):
    api, _, _ = limited
    count = {"sql": "SELECT count(*) FROM projections"}
    fits = api.ok("POST", "/sql", count)["rows"][0][0]
    for page in ["journey-999999.html", "compare-1-99999999999999999999.html", "compare-99999999999999999999-1.html",
                 "journey-1-p999.html", "run-424242.html", "journey-99999999999999999999999999.html"]:
        start = time.perf_counter()
        status, got = api.call("GET", f"/reports/{page}")
        assert status == 404 and time.perf_counter() - start < 1.0, (page, status, got)
    assert api.ok("POST", "/sql", count)["rows"][0][0] == fits  # no fit ran


def test_a_report_that_needs_a_fit_answers_at_once_and_fits_in_the_background(limited):
    api, _, _ = limited
    start = time.perf_counter()
    status, page = api.call("GET", "/reports/journey-2.html")
    if status == 202:  # the run's maps are not stored yet: queued, not fitted inside the request
        assert time.perf_counter() - start < 2.0 and "fitting" in page
        end = time.time() + 300
        while status == 202 and time.time() < end:
            assert api.call("GET", "/healthz")[0] == 200
            time.sleep(0.5)
            status, page = api.call("GET", "/reports/journey-2.html")
    assert status == 200 and 'id="trajectory"' in page
    methods = api.ok("POST", "/sql", {"sql": "SELECT DISTINCT method FROM projections ORDER BY 1"})["rows"]
    assert methods == [["pca"]]  # only the map the page draws: no UMAP fit for a page


def test_cross_site_requests_are_refused(limited):
    api, _, _ = limited
    for headers in [{"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"},
                    {"referer": "http://evil.example/page.html"}, {"origin": "http://evil.example"}]:
        status, got = api.call("GET", "/reports/journey-1.html", headers=headers)
        assert status == 403 and "refused" in got["detail"].lower(), (headers, got)
        status, _ = api.call("POST", "/runs", {"prompts": ["cross"]}, headers=headers)
        assert status == 403
    for headers in [{"sec-fetch-site": "same-origin"}, {"sec-fetch-site": "none"},
                    {"referer": f"http://127.0.0.1:{api.port}/docs"}]:
        assert api.call("GET", "/reports/index.html", headers=headers)[0] == 200


def test_docs_render_offline_in_chromium(limited):
    playwright = pytest.importorskip("playwright.sync_api")
    api, _, _ = limited
    status, _ = api.call("GET", "/docs")
    assert status == 200
    origin = f"http://127.0.0.1:{api.port}"
    requests, errors = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            response = page.goto(origin + "/docs", wait_until="networkidle", timeout=30_000)
            csp = response.headers.get("content-security-policy", "")
            page.wait_for_selector("section.op", timeout=10_000)
            ops = page.locator("section.op").count()
            text = page.inner_text("main")
            codes = page.locator("section.op code").all_inner_texts()  # docstrings' ``code``, shown as code
        finally:
            browser.close()
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert all(url.startswith(origin + "/") for url in requests), requests
    assert not errors, errors
    assert ops >= 10 and "/sql" in text and "time_limit" in text
    assert "``" not in text and "GET /runs/{run_id}" in codes, codes


def test_the_cli_shows_control_characters_through_the_server(limited, tmp_path):
    from tests.serve.test_serve import _cli

    _, db, _ = limited
    got = _cli("sql", "SELECT text FROM prompts WHERE text LIKE 'Escape%'", "--db", str(db), cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert "\x1b" not in got.stdout and "\x07" not in got.stdout and "\\x1b]0;pwned\\x07" in got.stdout
    got = _cli("sql", "SELECT text FROM prompts WHERE text LIKE 'Escape%'", "--db", str(db), "--json", cwd=tmp_path)
    assert json.loads(got.stdout) == [{"text": HOSTILE}]
    got = _cli("sql", "SELECT 1", "--db", str(db), "--time-limit", "nan", cwd=tmp_path)
    assert got.returncode == 2 and got.stderr.strip().count("\n") == 0 and "Traceback" not in got.stderr


def test_concurrent_queries_share_the_budget_one_at_a_time(limited):
    api, _, _ = limited
    results = []

    def one():
        results.append(api.call("POST", "/sql", {"sql": "SELECT count(*) FROM range(3000000)"}))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r[0] for r in results] == [200] * 4 and all(r[1]["rows"] == [[3000000]] for r in results)


def test_readers_overlap_a_short_query_answers_while_a_long_one_runs(limited):
    api, _, _ = limited
    assert api.ok("GET", "/healthz")["sql_readers"]["slots"] >= 2
    replies = []

    def long():
        replies.append(("long", *api.call("POST", "/sql", {"sql": "SELECT count(*) FROM range(100000000000)",
                                                            "time_limit": 5})))

    thread = threading.Thread(target=long)
    thread.start()
    end = time.time() + 30
    while api.ok("GET", "/healthz")["sql_readers"]["busy"] < 1 and time.time() < end:
        time.sleep(0.01)
    assert not replies  # the long query holds a reader slot and runs
    short = api.call("POST", "/sql", {"sql": "SELECT count(*) FROM runs"})
    replies.append(("short", *short))
    thread.join(60)
    assert [r[0] for r in replies] == ["short", "long"], replies  # one query at a time would answer them the other way
    assert replies[0][1] == 200 and replies[1][1] == 408


def test_an_honest_query_beside_a_memory_bomb_is_answered(limited):
    api, _, _ = limited
    replies = {}

    def one(name, sql):
        replies[name] = api.call("POST", "/sql", {"sql": sql, "time_limit": 5})

    threads = [threading.Thread(target=one, args=("bomb", BOMBS["list aggregate"])),
               threading.Thread(target=one, args=("honest", "SELECT count(*), sum(i) FROM range(60000000) t(i)"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert replies["bomb"][0] == 403 and f"needs more than {BUDGET_MB} MB" in replies["bomb"][1]["detail"], replies
    assert replies["honest"][0] == 200 and replies["honest"][1]["rows"][0][0] == 60000000, replies["honest"]


def test_honest_queries_during_a_job_are_never_refused(limited):
    api, _, _ = limited
    job = api.ok("POST", "/runs", {"prompts": [p + " again" for p in PROMPTS[:30]], "batch_size": 2})
    statuses, end = [], time.time() + 120
    while time.time() < end:
        statuses.append(api.call("POST", "/sql", {"sql": "SELECT * FROM trajectory WHERE prompt_id = ?",
                                                  "params": [1 + len(statuses) % 3]})[0])
        statuses.append(api.call("POST", "/sql", {"sql": "SELECT * FROM journey LIMIT 50"})[0])
        statuses.append(api.call("GET", "/runs")[0])
        if api.ok("GET", f"/runs/{job['run_id']}")["job"]["status"] not in ("queued", "running"):
            break
    assert api.wait(job["run_id"])["job"]["status"] == "done"
    assert len(statuses) >= 6 and set(statuses) == {200}, statuses


def test_sql_answers_as_arrow_with_the_same_values_as_json(limited):
    import http.client

    import pyarrow as pa

    api, _, _ = limited
    body = {"sql": "SELECT * FROM trajectory WHERE prompt_id = ? ORDER BY pos, layer", "params": [1], "max_rows": 5}
    as_json = api.ok("POST", "/sql", body)
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
    conn.request("POST", "/sql", body=json.dumps(body).encode(),
                 headers={"content-type": "application/json", "accept": "application/vnd.apache.arrow.stream"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    assert resp.status == 200 and resp.getheader("content-type") == "application/vnd.apache.arrow.stream"
    table = pa.ipc.open_stream(data).read_all()
    assert table.column_names == as_json["columns"] and table.num_rows == len(as_json["rows"]) == 5
    assert [list(r.values()) for r in table.to_pylist()] == as_json["rows"]
    assert resp.getheader("x-geomap-truncated") == str(as_json["truncated"]).lower() == "true"

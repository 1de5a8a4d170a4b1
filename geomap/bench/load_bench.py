"""``geomap bench --load``: the server under many clients, idle and while a job ingests (the soak: `soak_bench`).

The benchmark starts its own ``geomap serve`` on 127.0.0.1 (a free port) over a store, sends a mix of requests from
client threads, and stops the server when done. Clients talk to that server only. Every loop is bounded by a count
and a time. The mix, per client, in turn:

- ``trajectory``: ``POST /sql`` ``SELECT * FROM trajectory WHERE prompt_id = ?`` (a random stored prompt);
- ``runs``: ``GET /runs``;
- ``journey``: ``POST /sql`` ``SELECT * FROM journey LIMIT 50``.

A 403 or 408 is a refusal (the budget or the time limit), any other failure an error. The idle phases of the client
counts run in interleaved rounds (`run_load`), so a drift of the machine's speed falls on every count alike.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from geomap.bench import prompts as bench_prompts

KINDS = ("trajectory", "runs", "journey")
MAX_REQUESTS = 20_000  # per client and phase, whatever the time left


@dataclass
class Phase:
    """What one phase measured: latencies (seconds) per kind, refusals, errors, wall time, the server's peak RSS."""

    name: str
    clients: int
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    server_cpu_s: float = 0.0

    def requests(self) -> int:
        """Answered requests (refusals included)."""
        return sum(len(v) for v in self.latencies.values())

    def absorb(self, other: Phase) -> None:
        """Add another slice of the same phase: its latencies, refusals, errors, time and CPU; the higher peak."""
        for kind in KINDS:
            self.latencies[kind] += other.latencies[kind]
        self.refused += other.refused
        self.errors += other.errors
        self.seconds += other.seconds
        self.server_cpu_s += other.server_cpu_s
        self.peak_rss_mb = max(self.peak_rss_mb, other.peak_rss_mb)

    def row(self) -> dict:
        """A JSON-ready summary: req/s, p50/p99 ms per kind, refusals, errors."""
        out = {"phase": self.name, "clients": self.clients, "requests": self.requests(),
               "req_per_s": round(self.requests() / self.seconds, 1) if self.seconds else 0.0,
               "refused": self.refused, "errors": len(self.errors), "peak_rss_mb": round(self.peak_rss_mb),
               "server_cpu_ms_per_request": round(1000 * self.server_cpu_s / max(1, self.requests()), 2)}
        for kind, values in self.latencies.items():
            values = sorted(values)
            out[f"{kind}_p50_ms"] = round(1000 * _pct(values, 0.50), 1) if values else None
            out[f"{kind}_p99_ms"] = round(1000 * _pct(values, 0.99), 1) if values else None
        return out


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


class Client:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        """Send one request; reconnects once if the server closed an idle connection."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=data, headers={"content-type": "application/json"})
                response = self.conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def ok(self, method: str, path: str, body: dict | None = None):
        """The decoded JSON of a 2xx answer."""
        status, data = self.call(method, path, body)
        if not 200 <= status < 300:
            raise RuntimeError(f"{method} {path}: {status} {data[:300]!r}")
        return json.loads(data)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def rss_mb(pid: int) -> float:
    """A process's resident memory, MB (0 where it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far, seconds (0 where it cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def start_server(db: Path, model: str, log: Path, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """``geomap serve`` over ``db`` on a free loopback port; returns the process and port once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "geomap", "serve", "--db", str(db), "--host", "127.0.0.1", "--port", str(port),
           "--model", model, *extra]
    handle = log.open("w")
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ})
    end = time.time() + 180
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            probe = Client(port)
            if probe.call("GET", "/healthz")[0] == 200:
                probe.close()
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not answer within 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server (SIGTERM, then SIGKILL after 30 s)."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _request(client: Client, kind: str, ids: list[int], rng: random.Random) -> tuple[int, bytes]:
    if kind == "trajectory":
        return client.call("POST", "/sql", {"sql": "SELECT * FROM trajectory WHERE prompt_id = ?",
                                            "params": [rng.choice(ids)]})
    if kind == "runs":
        return client.call("GET", "/runs")
    return client.call("POST", "/sql", {"sql": "SELECT * FROM journey LIMIT 50"})


def load(port: int, pid: int, name: str, clients: int, seconds: float, ids: list[int],
         until: Callable[[], bool] | None = None) -> Phase:
    """Run ``clients`` threads of the mix for ``seconds`` (or until ``until()`` turns true, within ``seconds``)."""
    phase = Phase(name, clients)
    lock = threading.Lock()
    end = time.perf_counter() + seconds
    stop = threading.Event()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        client = Client(port)
        try:
            for i in range(MAX_REQUESTS):
                if stop.is_set() or time.perf_counter() > end:
                    return
                kind = KINDS[(i + seed) % len(KINDS)]
                start = time.perf_counter()
                try:
                    status, body = _request(client, kind, ids, rng)
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        phase.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                    continue
                took = time.perf_counter() - start
                with lock:
                    phase.latencies[kind].append(took)
                    if status in (403, 408):
                        phase.refused += 1
                    elif status != 200:
                        phase.errors.append(f"{kind}: {status} {body[:200]!r}")
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    began, cpu = time.perf_counter(), cpu_seconds(pid)
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        phase.peak_rss_mb = max(phase.peak_rss_mb, rss_mb(pid))
        if until is not None and until():
            stop.set()
        time.sleep(0.1)
    for t in threads:
        t.join()
    phase.seconds = time.perf_counter() - began
    phase.server_cpu_s = cpu_seconds(pid) - cpu
    return phase


def submit_job(client: Client, texts: list[str]) -> int:
    """Queue an ingestion job of ``texts``; returns its run id."""
    return int(client.ok("POST", "/runs", {"prompts": texts, "name": "loadbench", "batch_size": 4})["run_id"])


def job_done(client: Client, run_id: int) -> bool:
    """Whether a job has left the queue and finished (done or failed)."""
    return client.ok("GET", f"/runs/{run_id}")["job"]["status"] not in ("queued", "running")


def fresh_texts(n: int, tag: str) -> list[str]:
    """``n`` prompts no store holds yet (each starts with ``tag``, a short word)."""
    return [f"{tag} {t}" for t in bench_prompts(n)]


def run_load(db: Path, model: str, clients: tuple[int, ...] = (1, 4, 16), seconds: float = 20.0,
             job_prompts: int = 40, say: Callable[[str], None] = print, rounds: int = 4) -> list[Phase]:
    """Idle and while-a-job-ingests phases at each client count, against a server this function starts.

    The idle phases are interleaved: ``rounds`` rounds, each running every client count for ``seconds / rounds``
    in turn, summed per count. A drift of the machine's speed (on a shared host the same work can take twice the
    CPU time a minute later) then falls on every count alike, so their ratios compare like with like.
    """
    proc, port = start_server(db, model, db.with_name(db.name + ".loadbench.log"))
    phases: list[Phase] = []
    try:
        admin = Client(port)
        ids = [r[0] for r in admin.ok("POST", "/sql", {"sql": "SELECT id FROM prompts WHERE status = 'done' "
                                                              "ORDER BY id", "max_rows": 1_000_000})["rows"]]
        if not ids:
            raise RuntimeError(f"the store {db} holds no prompts: build one first")
        load(port, proc.pid, "warm-up", 2, 3.0, ids)
        idle = {n: Phase("idle", n) for n in clients}
        for r in range(rounds):
            say(f"load: idle, round {r + 1} of {rounds}: {', '.join(map(str, clients))} client(s), "
                f"{seconds / rounds:g} s each")
            for n in clients:
                idle[n].absorb(load(port, proc.pid, "idle", n, seconds / rounds, ids))
        phases += idle.values()
        for n in clients:
            run_id = submit_job(admin, fresh_texts(job_prompts, f"L{n}x{time.time() % 1e5:.0f}"))
            say(f"load: {n} client(s) while job {run_id} ingests {job_prompts} prompts")
            phase = load(port, proc.pid, "job", n, max(seconds, 60.0), ids,
                         until=lambda r=run_id: job_done(admin, r))
            phase.name = f"job ({job_prompts} prompts)"
            phases.append(phase)
            end = time.time() + 600
            while not job_done(admin, run_id) and time.time() < end:
                time.sleep(0.5)
            job = admin.ok("GET", f"/runs/{run_id}")["job"]
            if job["status"] != "done":  # a phase "while a job ingests" means nothing if the job did not
                phase.errors.append(f"job {run_id} ended {job['status']}: {str(job.get('error'))[:300]}")
        admin.close()
    finally:
        stop_server(proc)
    return phases


def build_store(db: Path, model: str, n_prompts: int, say: Callable[[str], None] = print) -> Path:
    """A store of ``n_prompts`` bench prompts ingested with ``model`` (skipped when ``db`` already holds them)."""
    from geomap.ingest.engine import ingest
    from geomap.models import load_model
    from geomap.store.writer import PromptSpec

    say(f"load: building a store of {n_prompts} prompts with {model} at {db}")
    loaded = load_model(model, device="cpu")
    ingest(loaded, [PromptSpec(t, source="bench") for t in bench_prompts(n_prompts)], db, batch_size=16,
           pipeline="loadbench-store", progress=False)
    return db


def as_markdown(phases: list[Phase]) -> str:
    """The load table as Markdown (the issue's columns)."""
    lines = ["| clients | phase | req/s | trajectory p50 / p99 | runs p50 / p99 | journey p50 / p99 | refused | "
             "errors | server RSS peak | server CPU / request |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in phases:
        r = p.row()

        def pair(kind: str, r: dict = r) -> str:
            return f"{r[f'{kind}_p50_ms']} / {r[f'{kind}_p99_ms']} ms"

        lines.append(f"| {p.clients} | {p.name} | {r['req_per_s']} | {pair('trajectory')} | {pair('runs')} | "
                     f"{pair('journey')} | {r['refused']} | {r['errors']} | {r['peak_rss_mb']} MB | "
                     f"{r['server_cpu_ms_per_request']} ms |")
    return "\n".join(lines + _ratios(phases))


def _ratios(phases: list[Phase]) -> list[str]:
    """A line under the table: each idle phase's throughput against the first idle phase's (fewest clients)."""
    idle = [p for p in phases if p.name == "idle" and p.seconds]
    if len(idle) < 2 or not idle[0].requests():
        return []
    base = idle[0].requests() / idle[0].seconds
    parts = [f"{p.clients} clients {p.requests() / p.seconds / base:.2f}x" for p in idle[1:]]
    return ["", f"Idle throughput against {idle[0].clients} client(s), interleaved rounds: {', '.join(parts)}."]

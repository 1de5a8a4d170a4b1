"""``geomap bench --load --soak MINUTES``: mixed load plus one ingestion job after another, memory and rows checked.

The soak repeats ingestion jobs under mixed load (`geomap.bench.load_bench`), samples the server's resident memory
after each job, fails on more than `SOAK_GROWTH` growth after its warm-up, and checks that every job's prompts and
states are stored exactly once.

Beside the resident set it samples what DuckDB accounts for (``duckdb_memory()``): the buffer pool caches the
store's blocks up to the instance's ``memory_limit``, so while a growing store fills it the resident set grows by
design and stops at the cap. The growth judged is therefore that of the rest of the process (resident set minus
DuckDB's accounted memory), and DuckDB's own memory must stay within its limit; both resident figures are reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from geomap.bench.load_bench import (
    Client,
    Phase,
    fresh_texts,
    job_done,
    load,
    rss_mb,
    start_server,
    stop_server,
    submit_job,
)

SOAK_GROWTH = 0.10


def run_soak(db: Path, model: str, minutes: float, clients: int = 4, job_prompts: int = 20,
             say: Callable[[str], None] = print) -> dict:
    """Mixed load plus one ingestion job after another for ``minutes``; memory, errors and stored rows checked."""
    proc, port = start_server(db, model, db.with_name(db.name + ".soak.log"))
    samples: list[tuple[float, float, float]] = []  # minutes, resident MB, DuckDB's accounted MB
    jobs: list[tuple[int, int]] = []
    duck_limit = 0.0
    try:
        admin = Client(port)
        ids = [r[0] for r in admin.ok("POST", "/sql", {"sql": "SELECT id FROM prompts WHERE status = 'done' "
                                                              "ORDER BY id", "max_rows": 1_000_000})["rows"]]
        start = time.perf_counter()
        end = start + 60 * minutes
        total = Phase("soak", clients)
        while time.perf_counter() < end:
            run_id = submit_job(admin, fresh_texts(job_prompts, f"S{len(jobs)}x{time.time() % 1e5:.0f}"))
            jobs.append((run_id, job_prompts))
            phase = load(port, proc.pid, "soak", clients, max(1.0, min(120.0, end - time.perf_counter())), ids,
                         until=lambda r=run_id: job_done(admin, r))
            total.absorb(phase)
            duck, duck_limit = duckdb_mb(admin)
            samples.append((time.perf_counter() - start, rss_mb(proc.pid), duck))
            say(f"soak: {len(jobs)} job(s), {samples[-1][0] / 60:.1f} min, server RSS {samples[-1][1]:.0f} MB "
                f"(DuckDB {duck:.0f} of its {duck_limit:.0f} MB), {total.requests()} requests, "
                f"{len(total.errors)} errors")
        wait_end = time.time() + 600
        while jobs and not job_done(admin, jobs[-1][0]) and time.time() < wait_end:
            time.sleep(0.5)
        failed_jobs = [r for r, _ in jobs if admin.ok("GET", f"/runs/{r}")["job"]["status"] != "done"]
        stored = _stored_once(admin, jobs)
        admin.close()
    finally:
        stop_server(proc)
    rss_base, rss_last, rss_growth = _growth([(t, m) for t, m, _ in samples])
    base, last, growth = _growth([(t, m - d) for t, m, d in samples])
    duck_peak = max((d for _, _, d in samples), default=0.0)
    ok = (not total.errors and not failed_jobs and stored["ok"] and growth <= SOAK_GROWTH
          and duck_peak <= duck_limit * 1.02)
    return {"minutes": minutes, "jobs": len(jobs), "failed_jobs": failed_jobs, "load": total.row(),
            "rss_after_warmup_mb": round(rss_base), "rss_end_mb": round(rss_last), "rss_growth": round(rss_growth, 4),
            "beside_duckdb_after_warmup_mb": round(base), "beside_duckdb_end_mb": round(last),
            "beside_duckdb_growth": round(growth, 4), "duckdb_peak_mb": round(duck_peak),
            "duckdb_limit_mb": round(duck_limit),
            "rss_samples": [(round(t), round(m), round(d)) for t, m, d in samples], "stored_once": stored,
            "errors": total.errors[:20], "ok": ok}


def _growth(samples: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Medians of the first and the last quarter of the samples after the warm-up, and the growth between them.

    The warm-up is the first quarter of the soak's time.
    """
    warm = [m for t, m in samples if t >= samples[-1][0] * 0.25] if samples else []
    base = statistics.median(warm[: max(1, len(warm) // 4)]) if warm else 0.0
    last = statistics.median(warm[-max(1, len(warm) // 4):]) if warm else 0.0
    return base, last, (last - base) / base if base else 0.0


def duckdb_mb(client: Client) -> tuple[float, float]:
    """What the served DuckDB instance accounts for now, and its ``memory_limit``, MB (through ``POST /sql``)."""
    row = client.ok("POST", "/sql", {"sql": "SELECT (SELECT sum(memory_usage_bytes) FROM duckdb_memory()), "
                                            "(SELECT value FROM duckdb_settings() WHERE name = 'memory_limit')"})
    used, limit = row["rows"][0]
    return (used or 0) / 2**20, _size_mb(limit)


def _size_mb(text: str) -> float:
    """DuckDB's rendering of a size (``953.6 MiB``, ``1.9 GiB``, ``1.0 GB``) in MiB."""
    number, unit = text.split()
    scale = {"bytes": 2**-20, "KiB": 2**-10, "MiB": 1, "GiB": 2**10, "TiB": 2**20,
             "KB": 1e3 / 2**20, "MB": 1e6 / 2**20, "GB": 1e9 / 2**20, "TB": 1e12 / 2**20}
    return float(number) * scale[unit]


def _stored_once(client: Client, jobs: list[tuple[int, int]]) -> dict:
    """Every job's stored prompts are in the store once, under its run, and no prompt key or state is there twice."""
    sql = client.ok
    counted = sql("POST", "/sql", {"sql": "SELECT run_id, count(*) FROM prompts WHERE status = 'done' GROUP BY run_id",
                                   "max_rows": 100_000})["rows"]
    per_run = {run: n for run, n in counted}
    short, failed = {}, 0
    for run_id, n in jobs:
        progress = sql("GET", f"/runs/{run_id}")["job"]["progress"]
        failed += int(progress.get("failed") or 0)
        if per_run.get(run_id, 0) != progress.get("stored") or progress.get("stored", 0) + int(
                progress.get("failed") or 0) + int(progress.get("skipped") or 0) != n:
            short[run_id] = {"in the store": per_run.get(run_id, 0), "job": progress}
    dup_keys = sql("POST", "/sql", {"sql": "SELECT count(*) FROM (SELECT key FROM prompts GROUP BY key "
                                           "HAVING count(*) > 1)", "time_limit": 60})["rows"][0][0]
    dup_states = sql("POST", "/sql", {"sql": "SELECT count(*) FROM (SELECT prompt_id, pos, layer FROM states "
                                             "GROUP BY ALL HAVING count(*) > 1)", "time_limit": 60})["rows"][0][0]
    return {"ok": not short and dup_keys == 0 and dup_states == 0, "runs_not_matching": short,
            "prompts_failed": failed, "duplicate_prompt_keys": dup_keys, "duplicate_states": dup_states}

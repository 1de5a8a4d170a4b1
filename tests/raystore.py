"""What two stores must agree on after the same prompts went through different engines (or a kill and a rerun)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np

from geomap.store.writer import TABLES

PROMPTS = [f"Prompt number {i}: the storm is {'very ' * (i % 5)}close" for i in range(22)] + [
    "   ", "The capital of France is", "The storm is"]
MAX_REL_ERR = 1e-4  # the capture tests' tolerance for batched against unbatched journeys


def snapshot(db) -> dict:
    """Keys with their status, rows per table, rows per prompt key, and every state vector by (key, pos, layer)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("prompts", *TABLES)}
        keys = dict(con.execute("SELECT key, status FROM prompts").fetchall())
        per_key = {t: dict(con.execute(f"SELECT p.key, count(*) FROM {t} x JOIN prompts p ON p.id = x.prompt_id "
                                       "GROUP BY p.key").fetchall()) for t in TABLES}
        rows = con.execute("""SELECT p.key, s.pos, s.layer, s.vec FROM states s JOIN prompts p ON p.id = s.prompt_id
                              ORDER BY p.key, s.layer, s.pos""").fetchall()
        duplicates = con.execute("SELECT key FROM prompts GROUP BY key HAVING count(*) > 1").fetchall()
        state_ids = con.execute("SELECT min(id), max(id), count(*) FROM states").fetchall()[0]
    finally:
        con.close()
    vectors = {(k, pos, layer): np.asarray(vec, np.float32) for k, pos, layer, vec in rows}
    return {"counts": counts, "keys": keys, "per_key": per_key, "vectors": vectors, "duplicates": duplicates,
            "state_ids": state_ids}


def assert_same_store(got: dict, want: dict) -> None:
    """Same keys (and statuses), same rows per table and per prompt, vectors within the batching tolerance."""
    assert got["duplicates"] == []
    assert got["keys"] == want["keys"]
    assert got["counts"] == want["counts"]
    assert got["per_key"] == want["per_key"]
    assert got["vectors"].keys() == want["vectors"].keys()
    a = np.stack([got["vectors"][k] for k in sorted(want["vectors"])])
    b = np.stack([want["vectors"][k] for k in sorted(want["vectors"])])
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= MAX_REL_ERR
    assert np.abs(a - b).max() <= MAX_REL_ERR * np.abs(b).max()
    n = got["counts"]["states"]
    assert got["state_ids"] == (1, n, n)  # contiguous ids: nothing merged twice, nothing lost


def capture_worker_pids(root: int) -> list[int]:
    """Processes of Ray capture actors that descend from process ``root`` (their title names them)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if title.startswith("ray::MapWorker") and "CaptureWorker" in title and _descends(int(entry.name), root):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _descends(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False

"""Run rows: a server reserves queued runs while its job thread fills earlier ones; ids are never handed out twice."""

from __future__ import annotations

from geomap.capture.config import CaptureConfig
from geomap.ingest.runs import reserve_run, start_run
from geomap.store.db import connect, ensure_schema


class _Interleaved:
    """A connection on which another writer (the server's request thread) reserves a run after statement ``at``."""

    def __init__(self, con, other, at: int):
        self.con, self.other, self.at, self.statements, self.reserved = con, other, at, 0, None

    def execute(self, sql: str, params=None):
        result = self.con.execute(sql, params)
        if self.statements == self.at:
            self.reserved = reserve_run(self.other, "api")
        self.statements += 1
        return result


def test_a_queued_run_is_filled_in_place_while_another_is_reserved(tiny_models, tmp_path):
    """Whichever statement of `start_run` the other reservation falls after, both runs keep their own ids."""
    loaded = tiny_models["llama"]
    at = 0
    while True:
        db = tmp_path / f"runs-{at}.duckdb"
        job, request = connect(db), connect(db)  # two connections of one process, as the server's threads hold
        try:
            ensure_schema(job, loaded.anatomy.d_model)
            first = reserve_run(request, "api")
            interleaved = _Interleaved(job, request, at)
            assert start_run(interleaved, loaded, CaptureConfig(), "float32", "api", first) == first
            rows = job.execute("SELECT id, status FROM runs ORDER BY id").fetchall()
        finally:
            job.close()
            request.close()
        if interleaved.reserved is None:  # past start_run's last statement
            break
        assert rows == [(first, "running"), (interleaved.reserved, "queued")], (at, rows)
        at += 1
    assert at >= 1

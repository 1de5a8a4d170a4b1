"""The demo pipeline on the real default model through Ray gives the inline run's `journey` view."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = "prompt_id, text, tags, n_tokens, last_token, top1_id, top1_token, top1_prob, entropy, prediction_depth"


def _journey(db: Path) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(f"SELECT {COLUMNS} FROM journey ORDER BY prompt_id").fetchall()
    finally:
        con.close()


@pytest.mark.real
def test_journey_pipeline_on_ray_gives_the_inline_journey_view(real, tmp_path):
    pytest.importorskip("ray")
    views = {}
    for engine in ("inline", "ray"):
        db = tmp_path / f"{engine}.duckdb"
        extra = ["--workers", "2"] if engine == "ray" else []
        got = subprocess.run([sys.executable, "-m", "geomap", "run", "pipelines/journey.toml", "--db", str(db),
                              "--no-reports", "--engine", engine, *extra], cwd=ROOT, capture_output=True, text=True,
                             timeout=1200)
        assert got.returncode == 0, got.stderr[-3000:]
        views[engine] = _journey(db)
    inline, ray = views["inline"], views["ray"]
    prompts = len((ROOT / "pipelines" / "prompts" / "journey.jsonl").read_text(encoding="utf-8").splitlines())
    assert len(inline) == len(ray) == 2 * prompts  # each prompt and its stored greedy continuation
    for a, b in zip(inline, ray):
        assert a[:7] == b[:7]  # id, text, tags, tokens, last token and the model's top-1 choice
        np.testing.assert_allclose(b[7:9], a[7:9], rtol=1e-4)  # its probability and the entropy
        assert a[9] == b[9]  # prediction depth

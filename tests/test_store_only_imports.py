"""Store-only commands (`geomap sql`, `stats`, `index`, `export`) never import torch or transformers: they start
fast and run where only the store is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
from click.testing import CliRunner
from geomap.cli import cli
result = CliRunner().invoke(cli, sys.argv[1:])
print(json.dumps({"exit": result.exit_code, "output": result.output, "error": repr(result.exception),
                  "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from geomap.store.db import ensure_schema
    from geomap.store.handle import Store

    db = tmp_path_factory.mktemp("cold") / "s.duckdb"
    with Store.open(db, "w") as opened, opened.writer() as con:
        ensure_schema(con, 8)
    return db


@pytest.mark.parametrize("args", [["sql", "SELECT count(*) AS n FROM runs"], ["index", "verify"],
                                  ["stats", "--prompt", "1"], ["export", "runs", "--quiet", "--out", "runs.parquet"]],
                         ids=["sql", "index", "stats", "export"])
def test_a_store_only_command_loads_no_torch(store, args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [str(tmp_path / a) if a.endswith(".parquet") else a for a in args]
    done = subprocess.run([sys.executable, "-c", PROBE, *args, "--db", str(store)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [], got
    if args[0] == "stats":  # it ran far enough to look the prompt up
        assert "No stored prompt with id 1" in got["error"], got
    else:
        assert got["exit"] == 0, got

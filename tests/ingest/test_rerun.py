"""A rerun with nothing new answers from the model's identity alone: no model load, no run recorded; a rerun with
one new prompt loads the model and stores just that one."""

from __future__ import annotations

import json

from tests.forked import geomap
from tests.storedb import rows


def test_a_noop_rerun_loads_no_model_and_a_new_prompt_does(tiny_dirs, tmp_path):
    source = tmp_path / "p.txt"
    source.write_text("The storm is\nThe market is\n")
    db = tmp_path / "s.duckdb"
    pipe = tmp_path / "p.toml"
    pipe.write_text(f'name = "t"\nmodel = "{tiny_dirs["llama"]}"\nstore = "{db}"\ncontinuation_tokens = 2\n'
                    '[[sources]]\npath = "p.txt"\n')
    first = geomap("run", str(pipe), "--json")
    assert first.status == 0, first.stderr
    before = rows(db, "SELECT count(*) FROM runs")
    again = geomap("run", str(pipe), "--json")
    assert again.status == 0, again.stderr
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["model_loaded"] is False  # answered from the model's identity, without the weights
    assert summary["run_id"] is None and summary["skipped"] == 2 and len(summary["prompts"]) == 2
    assert rows(db, "SELECT count(*) FROM runs") == before
    source.write_text("The storm is\nThe market is\nThe river is\n")
    third = geomap("run", str(pipe), "--json")
    assert third.status == 0, third.stderr
    assert "model_loaded" not in json.loads(third.stdout.strip().splitlines()[0])
    assert json.loads(third.stdout.strip().splitlines()[0])["stored"] == 1
    assert rows(db, "SELECT count(*) FROM journey WHERE kind = 'continuation'") == [(3,)]


def test_a_noop_rerun_imports_neither_torch_nor_transformers(tiny_dirs, tmp_path):
    """What makes a rerun with nothing new cheap: its whole path (pipeline, keys, store) imports no torch."""
    import subprocess
    import sys

    (tmp_path / "p.txt").write_text("The storm is\n")
    db = tmp_path / "s.duckdb"
    pipe = tmp_path / "p.toml"
    pipe.write_text(f'name = "t"\nmodel = "{tiny_dirs["llama"]}"\nstore = "{db}"\ncontinuation_tokens = 1\n'
                    '[[sources]]\npath = "p.txt"\n')
    assert geomap("run", str(pipe), "--no-reports").status == 0
    probe = ("import sys\nfrom geomap.cli import main\nsys.argv = ['geomap', 'run', sys.argv[1], '--no-reports']\n"
             "try:\n    main()\nexcept SystemExit as end:\n    assert not end.code, end.code\n"
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, str(pipe)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "no prompts to store" in done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"

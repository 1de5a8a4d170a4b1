"""Terminal-safe text output, and the CLI's SQL limits: hostile stored text never reaches the terminal raw, JSON stays
exact, bad limits are one clear line, and a memory-hungry query is refused within its budget."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from geomap.cli import cli
from geomap.cli.textout import visible

HOSTILE = "Title \x1b]0;pwned\x07 clear \x1b[2J csi \x9b31m rtl \u202eevil"
RAW = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def test_visible_shows_controls_and_keeps_text():
    assert visible("a\x1b[2Jb") == "a\\x1b[2Jb" and visible("tab\tnew\nline é ✓") == "tab\tnew\nline é ✓"
    assert visible("\x07\x7f\x9b\u202e") == "\\x07\\u007f\\u009b\\u202e"
    assert not RAW.search(visible("".join(chr(i) for i in range(0x2070)).replace("\n", "").replace("\t", "")))


@pytest.fixture(scope="module")
def hostile_store(tiny_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    src = folder / "p.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in [HOSTILE, "The storm is", "The market is"]) + "\n",
                   encoding="utf-8")
    db = folder / "h.duckdb"
    got = CliRunner().invoke(cli, ["ingest", str(src), "--db", str(db), "--model", str(tiny_dirs["llama"])])
    assert got.exit_code == 0, got.output
    return db, tiny_dirs["llama"]


def _run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout


def test_every_text_output_shows_control_characters(hostile_store):
    db, model = hostile_store
    outputs = {
        "sql table": _run("sql", "SELECT id, text FROM prompts ORDER BY id", "--db", str(db)),
        "sql csv": _run("sql", "SELECT id, text FROM prompts ORDER BY id", "--db", str(db), "--format", "csv"),
        "neighbors": _run("neighbors", "--prompt", "2", "--layer", "1", "-k", "3", "--db", str(db)),
        "stats": _run("stats", "--prompt", "1", "--db", str(db)),
        "trace": _run("trace", HOSTILE, "--model", str(model)),
    }
    for name, text in outputs.items():
        assert not RAW.search(text), (name, text)
    assert "\\x1b]0;pwned\\x07" in outputs["sql table"] and "\\u202eevil" in outputs["sql csv"]
    assert "Title" in outputs["neighbors"] or "storm" in outputs["neighbors"]


def test_json_output_stays_exact(hostile_store):
    db, _ = hostile_store
    got = json.loads(_run("sql", "SELECT text FROM prompts WHERE id = 1", "--db", str(db), "--json"))
    assert got == [{"text": HOSTILE}]


def _geomap(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m geomap ARGS`` in a child that prints its peak resident memory (VmHWM, kB) last on stderr."""
    code = ("import sys, runpy\nsys.argv = ['geomap'] + sys.argv[1:]\ntry:\n    runpy.run_module('geomap', "
            "run_name='__main__')\nfinally:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]"
            "\n    sys.stderr.write('\\nHWM ' + hwm[0].split()[1] + '\\n')\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("option", [("--time-limit", "0"), ("--time-limit", "-1"), ("--time-limit", "nan"),
                                    ("--time-limit", "inf"), ("--max-rows", "0"), ("--memory", "-5")])
def test_bad_limits_are_one_clear_line(hostile_store, option):
    db, _ = hostile_store
    got = _geomap("sql", "SELECT 1", "--db", str(db), *option)
    lines = [line for line in got.stderr.splitlines() if line and not line.startswith("HWM")]
    assert got.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), got.stderr
    assert "Traceback" not in got.stderr


def test_the_cli_refuses_memory_bombs_within_its_budget(hostile_store):
    db, _ = hostile_store
    base = _geomap("sql", "SELECT 1", "--db", str(db))
    base_kb = int(base.stderr.rsplit("HWM ", 1)[1])
    budget = 256
    for sql in ["SELECT len(range(1e8))", "SELECT list(range(1e9))",
                "SELECT string_agg(repeat('x', 100000), '') FROM range(100000)",
                "SELECT list(i) FROM range(400000000) t(i)",
                "SELECT i, range(2000) AS wide FROM range(1000000) t(i)",
                "SELECT len(string_agg(repeat('x', 10000) || i, '')) FROM range(1000000) t(i)"]:
        got = _geomap("sql", sql, "--db", str(db), "--memory", str(budget), "--time-limit", "10")
        assert got.returncode == 2 and f"needs more than {budget} MB" in got.stderr, (sql, got.stderr)
        peak_kb = int(got.stderr.rsplit("HWM ", 1)[1])
        assert peak_kb - base_kb < budget * 1024, (sql, peak_kb, base_kb)

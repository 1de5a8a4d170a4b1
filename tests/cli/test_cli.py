"""The geomap command line, on the real default model and on tiny ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from geomap.capture import capture
from geomap.cli import cli


def _geomap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geomap", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


@pytest.mark.real
def test_trace_the_storm_is_json():
    done = _geomap("trace", "The storm is", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["model"] == "gemma-3-270m"
    assert [t["text"] for t in out["tokens"]] == ["<bos>", "The", " storm", " is"]
    assert " coming" in [c["token"] for c in out["next_tokens"][:3]]
    assert len(out["next_tokens"]) == 10 and out["next_tokens"][0]["prob"] >= out["next_tokens"][1]["prob"]
    assert [entry["layer"] for entry in out["layers"]] == list(range(19))
    last = out["layers"][-1]
    assert last["lens_top"][0]["id"] == out["next_tokens"][0]["id"]
    assert len(last["heads"]) == 4 and all(0 <= h["pos"] < 4 for h in last["heads"])


@pytest.mark.real
def test_capital_of_france(real):
    (j,) = capture(real, ["The capital of France is"])
    top5 = [real.tokenizer.decode([int(i)]) for i in j.final.ids[-1, :5]]
    assert " Paris" in top5


def test_trace_text_output_on_a_tiny_model(tiny_dirs):
    result = CliRunner().invoke(cli, ["trace", "The storm is", "--model", str(tiny_dirs["gpt2"])])
    assert result.exit_code == 0, result.output
    assert "logit lens" in result.output and "next token" in result.output


def test_trace_errors_are_clear(tiny_dirs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["trace", "   ", "--model", str(tiny_dirs["llama"])])
    assert result.exit_code != 0 and "empty" in str(result.exception)
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"ok prompt\n\xff\n")
    result = runner.invoke(cli, ["trace", "--file", str(bad), "--model", str(tiny_dirs["llama"])])
    assert "line 2" in str(result.exception)


def test_trace_file_reports_failures_and_proceeds(tiny_dirs, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The storm is\n" + "storm " * 100 + "\nParis\n")
    done = _geomap("trace", "--file", str(prompts), "--json", "--model", str(tiny_dirs["llama"]))
    assert done.returncode == 2
    assert "prompt 2" in done.stderr and "context window" in done.stderr
    assert [json.loads(line)["text"] for line in done.stdout.splitlines()] == ["The storm is", "Paris"]


def test_models_lists_presets():
    done = _geomap("models", "--json")
    rows = json.loads(done.stdout)
    assert {r["name"] for r in rows} == {"gemma-3-270m", "smollm2-135m"}
    assert all(r["install"].startswith("pip install") for r in rows)
    assert [r["default"] for r in rows].count(True) == 1

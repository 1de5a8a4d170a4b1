"""The analysis commands end to end on the real model: JSON shapes, and the acceptance story of "The storm is"."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from geomap.cli import cli

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-analysis")
    prompts = folder / "p.txt"
    prompts.write_text("The storm is\nThe market is\nThe capital of France is\n", encoding="utf-8")
    store = folder / "s.duckdb"
    done = CliRunner().invoke(cli, ["ingest", str(prompts), "--db", str(store), "--attn-positions", "all",
                                    "--lens-positions", "all"])
    assert done.exit_code == 0, done.output
    return str(store)


def run(*args: str) -> dict:
    done = CliRunner().invoke(cli, [*args, "--json"])
    assert done.exit_code == 0, (done.output, done.exception)
    return json.loads(done.output)


def test_decode_json(db):
    out = run("decode", "--prompt", "1", "--temperature", "0.7", "--top-k", "5", "--seed", "1", "--db", db)
    assert {"kept", "chosen"} <= set(out) and len(out["kept"]) == 5
    assert set(out["kept"][0]) == {"id", "token", "prob"} and {"id", "token", "rank", "prob"} <= set(out["chosen"])
    assert out["kept"][0]["token"] == " coming" and out["exact"]
    assert sum(k["prob"] for k in out["kept"]) == pytest.approx(1, abs=1e-5)


def test_attribute_names_what_promotes_coming(db):
    out = run("attribute", "--prompt", "1", "--token", " coming", "--db", db)
    assert out["token"] == " coming" and {"token", "logit", "parts"} <= set(out)
    assert set(out["parts"][0]) == {"component", "layer", "head", "value", "level"}
    layer_level = [p for p in out["parts"] if p["level"] == "layer"]
    assert {p["component"] for p in layer_level} <= {"embed", "attn", "mlp", "bias"}
    assert sum(p["value"] for p in layer_level) == pytest.approx(out["model_logit"], abs=1e-3)
    top = out["promoting"][0]
    assert (top["component"], top["layer"]) == ("mlp", 17) and top["value"] > 4
    assert all(p["head"] is None for p in out["parts"] if p["component"] != "head")


def test_stats_give_the_layer_and_margin_of_coming(db):
    out = run("stats", "--prompt", "1", "--db", db)
    assert out["final"]["token"] == " coming" and out["prediction_depth"] == 17
    first = next(row for row in out["layers"] if row["top1_token"] == " coming")
    assert first["layer"] == 17 and first["lens_margin"] > 0.5


def test_geometry_json(db):
    out = run("geometry", "--prompt", "1", "--contrast", " banana", "--db", db)
    assert {"candidates", "margin", "nearest"} <= set(out)
    assert set(out["candidates"][0]) == {"id", "token", "dot", "cosine"}
    assert set(out["nearest"][0]) == {"id", "token", "score"}
    assert [c["id"] for c in out["candidates"]] == [n["id"] for n in out["nearest"]]
    assert out["contrast"][0]["token"] == " banana" and out["contrast"][0]["dot"] < out["candidates"][-1]["dot"]


def test_generate_json_matches_greedy(db, real):
    import torch

    out = run("generate", "The storm is", "--max-new-tokens", "8", "--db", db)
    assert {"prompt_id", "generated"} <= set(out) and set(out["generated"][0]) == {"id", "token", "prob"}
    ids = torch.tensor(real.tokenizer("The storm is")["input_ids"])[None]
    with torch.no_grad():
        expected = real.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=8)[0, ids.shape[1]:].tolist()
    assert [g["id"] for g in out["generated"]] == expected[: len(out["generated"])]
    assert out["parent_id"] == 1


def test_position_and_project_json(db):
    pos = run("position", "--prompt", "1", "--max-distance", "8", "--db", db)
    assert pos["kind"] == "rope" and len(pos["rows"]) == 18 * 4 * 9
    proj = run("project", "--run", "1", "--method", "pca", "--db", db)
    tokens = 4 + 4 + 6  # <bos> included: "The storm is", "The market is", "The capital of France is"
    assert proj["layers"] == list(range(19)) and proj["projections"][0]["n_points"] == 19 * tokens

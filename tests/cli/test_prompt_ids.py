"""Ids a user recognises: ingest prints which store id each of the user's prompts got, and every --prompt takes
the source's id or the content key as well as the store id."""

from __future__ import annotations

import json

import pytest

from tests.forked import geomap
from tests.storedb import rows


@pytest.fixture(scope="module")
def world(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("ids")
    source = root / "mine.jsonl"
    source.write_text('{"id": "storm", "text": "The storm is"}\n{"id": "17", "text": "Paris is"}\n'
                      '{"text": "The market is"}\n')
    db = root / "s.duckdb"
    done = geomap("ingest", str(source), "--db", str(db), "--model", str(tiny_dirs["llama"]), "--json")
    assert done.status == 0, done.stderr
    return db, json.loads(done.stdout), tiny_dirs["llama"], source


def test_ingest_json_maps_each_prompt_to_its_store_id(world):
    db, summary, _, _ = world
    stored = rows(db, "SELECT id, source_id, key FROM prompts ORDER BY id")
    assert summary["prompts"] == [{"prompt_id": i, "source_id": s, "key": k} for i, s, k in stored]
    assert [p["source_id"] for p in summary["prompts"]] == ["storm", "17", None]


def test_a_rerun_prints_the_mapping_too(world):
    db, summary, model, source = world
    done = geomap("ingest", str(source), "--db", str(db), "--model", str(model))
    assert done.status == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if x.startswith("prompt ids"))
    first, second, third = summary["prompts"]
    assert f"storm={first['prompt_id']}" in line and f"17={second['prompt_id']}" in line
    assert f"{third['key'][:12]}={third['prompt_id']}" in line


@pytest.mark.parametrize("ref", ["storm", "source:17", "KEY", "KEY8"])
def test_every_way_of_naming_a_prompt_finds_the_same_one(world, ref):
    db, summary, _, _ = world
    wanted = summary["prompts"][0 if ref == "storm" else 1 if ref == "source:17" else 2]
    ref = {"KEY": wanted["key"], "KEY8": wanted["key"][:8]}.get(ref, ref)
    done = geomap("neighbors", "--db", str(db), "--prompt", ref, "--layer", "1", "-k", "1", "--json")
    assert done.status == 0, done.stderr
    by_id = geomap("neighbors", "--db", str(db), "--prompt", str(wanted["prompt_id"]), "--layer", "1", "-k", "1",
                   "--json")
    assert json.loads(done.stdout) == json.loads(by_id.stdout)
    assert json.loads(done.stdout)[0]["prompt_id"] == wanted["prompt_id"]  # its own state is its nearest


def test_an_unknown_id_is_one_line(world):
    db, _, _, _ = world
    done = geomap("stats", "--db", str(db), "--prompt", "nosuch")
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert done.status == 2 and len(lines) == 1 and "'nosuch'" in lines[0] and "source id" in lines[0], lines

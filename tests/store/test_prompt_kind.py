"""Generations are separable: the journey and trajectory views name each row's kind and parent; old stores migrate."""

from __future__ import annotations

import pytest

from geomap.analysis.decoding import Strategy
from geomap.capture import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.ingest.generation import continue_prompts, generate
from geomap.store.db import connect, ensure_schema
from geomap.store.writer import PromptSpec
from tests.storedb import rows

PROMPTS = ["The storm is", "The market is", "Paris is the capital of"]


@pytest.fixture(scope="module")
def store(tiny_models, tmp_path_factory):
    model = tiny_models["llama"]
    db = tmp_path_factory.mktemp("kinds") / "k.duckdb"
    ingest(model, [PromptSpec(t, "p.jsonl", f"q{i}") for i, t in enumerate(PROMPTS)], db, CaptureConfig(),
           progress=False)
    continue_prompts(db, model, PROMPTS, 2, progress=False)
    generate(db, model, PROMPTS[0], 3, Strategy())
    return db


def test_journey_names_kind_and_parent(store):
    got = rows(store, "SELECT prompt_id, kind, parent_id, source_id, text FROM journey ORDER BY prompt_id")
    kinds = [r[1] for r in got]
    assert kinds.count("prompt") == 3 and kinds.count("continuation") == 3 and kinds.count("generation") == 1
    prompts = {r[4]: r[0] for r in got if r[1] == "prompt"}
    assert sorted(r[3] for r in got if r[1] == "prompt") == ["q0", "q1", "q2"]
    for _, kind, parent, _, text in got:
        assert (parent is None) == (kind == "prompt")
        if parent is not None:
            assert text.startswith(next(t for t, i in prompts.items() if i == parent))
    assert rows(store, "SELECT count(*) FROM journey WHERE kind = 'prompt'") == [(len(PROMPTS),)]


def test_trajectory_carries_the_same_kind(store):
    mismatched = rows(store, """SELECT count(*) FROM trajectory t JOIN journey j USING (prompt_id)
                                WHERE t.kind IS DISTINCT FROM j.kind OR t.parent_id IS DISTINCT FROM j.parent_id""")
    assert mismatched == [(0,)]
    assert rows(store, "SELECT count(DISTINCT kind) FROM trajectory") == [(3,)]


def test_an_older_stores_views_are_recreated(store, tmp_path):
    old = tmp_path / "old.duckdb"
    old.write_bytes(store.read_bytes())
    con = connect(old)
    con.execute("DROP VIEW trajectory")
    con.execute("CREATE VIEW trajectory AS SELECT prompt_id, pos, layer FROM states")  # as an older geomap left it
    con.execute("DELETE FROM store_meta WHERE key = 'schema_sha256'")
    con.close()
    assert "kind" not in [r[0] for r in rows(old, "DESCRIBE trajectory")]
    con = connect(old)
    ensure_schema(con)
    con.close()
    assert "kind" in [r[0] for r in rows(old, "DESCRIBE trajectory")]

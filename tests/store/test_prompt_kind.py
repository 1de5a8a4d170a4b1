"""Generations are separable: the journey and trajectory views name each row's kind and parent; old stores migrate."""

from __future__ import annotations

import pytest

from geomap.analysis.decoding import Strategy
from geomap.capture import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.ingest.generation import continue_prompts, generate
from geomap.store.db import connect, ensure_schema
from geomap.store.writer import PromptSpec
from tests.storedb import copy_store, rows

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


def _copy(store, old) -> None:
    """A copy of the store's file, with its segment folder when it has one (a segments store's vectors)."""
    copy_store(store, old)


def test_an_older_stores_views_are_recreated(store, tmp_path):
    old = tmp_path / "old.duckdb"
    _copy(store, old)
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


_READ_TIME_JOURNEY = """
WITH last AS (SELECT id AS prompt_id, n_tokens - 1 AS pos FROM prompts WHERE status = 'done'),
depth AS (
    SELECT l.prompt_id, coalesce(max(l.layer) FILTER (WHERE l.final_rank > 1) + 1, 0) AS prediction_depth
    FROM lens_stats l JOIN last USING (prompt_id, pos) GROUP BY l.prompt_id
)
SELECT p.id AS prompt_id, p.run_id, p.text, p.tags, p.n_tokens,
       t.text AS last_token, n.token_ids[1] AS top1_id, v.text AS top1_token, n.probs[1] AS top1_prob,
       n.entropy, d.prediction_depth, k.kind, p.parent_id, p.source_id
FROM prompts p
JOIN last ON last.prompt_id = p.id
JOIN tokens t ON t.prompt_id = p.id AND t.pos = last.pos
JOIN next_token n ON n.prompt_id = p.id AND n.pos = last.pos
JOIN runs r ON r.id = p.run_id
LEFT JOIN vocab v ON v.weights_sha256 = r.weights_sha256 AND v.token_id = n.token_ids[1]
LEFT JOIN depth d ON d.prompt_id = p.id
LEFT JOIN prompt_kind k ON k.prompt_id = p.id
ORDER BY p.id
"""


def test_journey_facts_equal_the_journey_computed_at_read_time(store):
    """`journey` reads `journey_facts`, written with each batch: it equals the view computed from the rows."""
    assert rows(store, "SELECT * FROM journey ORDER BY prompt_id") == rows(store, _READ_TIME_JOURNEY)
    assert rows(store, "SELECT count(*) FROM journey") == [(7,)]


def test_an_older_store_gets_its_journey_facts_when_opened_for_writing(store, tmp_path):
    old = tmp_path / "old.duckdb"
    _copy(store, old)
    con = connect(old)
    con.execute("DELETE FROM journey_facts WHERE prompt_id % 2 = 1")  # as if stored before the table existed
    con.execute("DELETE FROM store_meta WHERE key = 'schema_sha256'")
    con.close()
    assert len(rows(old, "SELECT * FROM journey")) < 7
    con = connect(old)
    ensure_schema(con)
    con.close()
    assert rows(old, "SELECT * FROM journey ORDER BY prompt_id") == rows(store, _READ_TIME_JOURNEY)


def test_facts_stored_before_top1_token_and_kind_were_facts_get_them(store, tmp_path):
    old = tmp_path / "old.duckdb"
    _copy(store, old)
    con = connect(old)
    con.execute("DROP VIEW journey")  # the view of that geomap joined the vocabulary and prompt_kind at read time
    con.execute("ALTER TABLE journey_facts DROP COLUMN top1_token")
    con.execute("ALTER TABLE journey_facts DROP COLUMN kind")
    con.execute("DELETE FROM store_meta WHERE key = 'schema_sha256'")
    con.close()
    con = connect(old)
    ensure_schema(con)
    con.close()
    assert rows(old, "SELECT count(*) FROM journey_facts WHERE kind IS NULL OR top1_token IS NULL") == [(0,)]
    assert rows(old, "SELECT * FROM journey ORDER BY prompt_id") == rows(store, _READ_TIME_JOURNEY)

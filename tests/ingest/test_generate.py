"""Generation: greedy equals transformers' generate; stored as a linked prompt with one decision per step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geomap.analysis.decoding import Strategy
from geomap.analysis.generate import generate_tokens
from geomap.ingest.generation import generate
from tests.storedb import rows

PROMPT = "The storm is"


@pytest.fixture(params=["llama", "gemma3_text", pytest.param("real", marks=pytest.mark.real)])
def model(request, tiny_models):
    return request.getfixturevalue("real") if request.param == "real" else tiny_models[request.param]


def test_greedy_equals_transformers_generate(model):
    ours = generate_tokens(model, PROMPT, 8, Strategy())
    ids = torch.as_tensor(ours.prompt_ids)[None]
    with torch.no_grad():
        theirs = model.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                      pad_token_id=model.tokenizer.pad_token_id or 0)[0, ids.shape[1]:]
    n = len(ours.new_ids)
    assert ours.new_ids.tolist() == theirs[:n].tolist()
    assert ours.stopped == "eos" or n == 8
    assert all(d.exact and d.chosen_rank == 1 for d in ours.decisions)


def test_generation_is_stored_linked_and_idempotent(model, tmp_path):
    db = tmp_path / "g.duckdb"
    frame = generate(db, model, PROMPT, 5, Strategy())
    a = frame.attrs
    parent, gen = a["parent_id"], a["prompt_id"]
    snapshot = rows(db, "SELECT * FROM tokens WHERE prompt_id = ? ORDER BY pos", parent)
    (n0,) = rows(db, "SELECT n_tokens FROM prompts WHERE id = ?", parent)[0]
    n_new = len(frame)
    assert rows(db, "SELECT parent_id, n_tokens, decoding IS NOT NULL FROM prompts WHERE id = ?", gen) == [
        (parent, n0 + n_new, True)]
    flags = [r[0] for r in rows(db, "SELECT generated FROM tokens WHERE prompt_id = ? ORDER BY pos", gen)]
    assert flags == [False] * n0 + [True] * n_new
    decisions = rows(db, "SELECT step, pos, chosen_id, exact, source FROM decisions WHERE prompt_id = ? "
                         "ORDER BY step", gen)
    assert [(d[0], d[1]) for d in decisions] == [(i, n0 - 1 + i) for i in range(n_new)]
    assert [d[2] for d in decisions] == frame["id"].tolist() and all(d[3] and d[4] == "generate" for d in decisions)
    # The stored journey agrees with the decisions: the captured final top-1 at each decision position.
    top1 = [r[0] for r in rows(db, "SELECT token_ids[1] FROM next_token WHERE prompt_id = ? AND pos >= ? "
                                   "ORDER BY pos", gen, n0 - 1)]
    assert top1[:n_new] == frame["id"].tolist()
    lens = rows(db, "SELECT count(DISTINCT pos) FROM lens_stats WHERE prompt_id = ?", gen)[0][0]
    assert lens == n_new + 1
    before = rows(db, "SELECT count(*) FROM prompts")[0][0]
    again = generate(db, model, PROMPT, 5, Strategy())
    assert again.attrs["prompt_id"] == gen and rows(db, "SELECT count(*) FROM prompts")[0][0] == before
    assert rows(db, "SELECT * FROM tokens WHERE prompt_id = ? ORDER BY pos", parent) == snapshot
    sampled = generate(db, model, PROMPT, 5, Strategy(temperature=1.2, top_p=0.95, seed=3))
    assert sampled.attrs["prompt_id"] != gen and sampled.attrs["parent_id"] == parent
    repeat = generate_tokens(model, PROMPT, 5, Strategy(temperature=1.2, top_p=0.95, seed=3))
    assert repeat.new_ids.tolist() == sampled["id"].tolist()
    seeds = [r[0] for r in rows(db, "SELECT seed FROM decisions WHERE prompt_id = ? ORDER BY step",
                                sampled.attrs["prompt_id"])]
    assert seeds == list(range(3, 3 + len(seeds)))
    np.testing.assert_array_equal(rows(db, "SELECT count(*) FROM states WHERE prompt_id = ?", gen)[0][0],
                                  (n0 + n_new) * (model.anatomy.n_layers + 1))

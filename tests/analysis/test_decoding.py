"""Decoding decisions against transformers' own logits processors, and the honesty of the `exact` flag."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from geomap.analysis.decoding import Candidates, DecodingError, Strategy, decide

STRATEGIES = [
    Strategy(temperature=0.7),
    Strategy(temperature=1.6, top_p=0.9),
    Strategy(top_p=0.95),
    Strategy(top_k=40),
    Strategy(temperature=1.3, top_k=200, top_p=0.8),
    Strategy(min_p=0.05),
    Strategy(temperature=2.0, min_p=0.02),
    Strategy(temperature=0.8, top_k=100, top_p=0.9, min_p=0.01),
    Strategy(top_p=0.5, min_p=0.3),
]


def hf_processed(logits: np.ndarray, s: Strategy) -> torch.Tensor:
    """transformers' processors in the order GenerationMixin builds them."""
    chain = LogitsProcessorList()
    if s.temperature != 1.0:
        chain.append(TemperatureLogitsWarper(s.temperature))
    if s.top_k is not None:
        chain.append(TopKLogitsWarper(top_k=s.top_k))
    if s.top_p is not None and s.top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=s.top_p))
    if s.min_p is not None:
        chain.append(MinPLogitsWarper(min_p=s.min_p))
    return chain(torch.zeros(1, 1, dtype=torch.long), torch.from_numpy(logits)[None].clone())[0]


def assert_matches_transformers(logits: np.ndarray, s: Strategy) -> int:
    d = decide(Candidates.from_full(logits), s)
    processed = hf_processed(logits, s)
    kept = torch.isfinite(processed)
    assert set(d.kept_ids.tolist()) == set(torch.nonzero(kept)[:, 0].tolist())
    probs = torch.softmax(processed, -1)
    np.testing.assert_allclose(d.kept_probs, probs[d.kept_ids].numpy(), rtol=1e-5, atol=1e-7)
    assert d.exact and abs(d.kept_probs.sum() - 1) < 1e-5
    assert d.chosen_id in set(d.kept_ids.tolist())
    assert d.chosen_rank == 1 + int((logits > logits[d.chosen_id]).sum())
    return len(d.kept_ids)


def random_logits(seed: int, vocab: int = 5000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0.0, 2.0, vocab) + 6.0 * (rng.random(vocab) < 0.002)).astype(np.float32)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_same_kept_set_and_probabilities_as_transformers(strategy):
    sizes = [assert_matches_transformers(random_logits(seed), strategy) for seed in range(3)]
    if strategy.top_p or strategy.min_p:
        print(strategy.name, "kept", sizes)


def test_large_nucleus_and_min_p_sets():
    logits = random_logits(7)
    assert assert_matches_transformers(logits, Strategy(temperature=1.5, top_p=0.9)) > 50
    assert assert_matches_transformers(logits, Strategy(temperature=1.2, min_p=0.01)) > 50


def test_greedy_is_argmax_and_seeded_draws_repeat():
    logits = random_logits(3)
    d = decide(Candidates.from_full(logits), Strategy())
    assert d.chosen_id == int(logits.argmax()) and d.exact and d.strategy.name == "greedy"
    a, b = (decide(Candidates.from_full(logits), Strategy(temperature=1.5, seed=11)) for _ in range(2))
    assert a.chosen_id == b.chosen_id
    draws = {decide(Candidates.from_full(logits), Strategy(temperature=3.0, seed=s)).chosen_id for s in range(20)}
    assert len(draws) > 1


def test_exact_flag_is_honest_on_top_k_candidates():
    """Decisions from the stored top-50 that claim to be exact equal the full-logit decisions."""
    claimed = 0
    for seed, s in itertools.product(range(4), STRATEGIES + [Strategy(top_p=0.3), Strategy(min_p=0.5)]):
        logits = random_logits(seed) * (1 + seed)
        full = Candidates.from_full(logits)
        top = Candidates(full.ids[:50], full.logits[:50], full.logsumexp, False)
        approx, exact = decide(top, s), decide(full, s)
        assert 0 <= top.tail_mass <= 1 and approx.tail_mass == pytest.approx(top.tail_mass)
        if approx.exact:
            claimed += 1
            assert approx.kept_ids.tolist() == exact.kept_ids.tolist()
            np.testing.assert_allclose(approx.kept_probs, exact.kept_probs, rtol=1e-4, atol=1e-7)
            if approx.cut_mass is not None:
                assert approx.cut_mass == pytest.approx(exact.cut_mass, rel=1e-4)
            else:
                assert s.temperature != 1.0
        elif s.temperature == 1.0 and s.top_k is None and s.top_p is not None and s.min_p is None:
            assert top.tail_mass > 1 - s.top_p  # only a nucleus reaching into the tail is approximate
    assert claimed >= 10


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"temperature": -1}, {"top_k": 0}, {"top_p": 0},
                                    {"top_p": 1.5}, {"min_p": -0.1}])
def test_bad_parameters_are_named(kwargs):
    with pytest.raises(DecodingError, match=next(iter(kwargs))):
        Strategy(**kwargs)


@pytest.mark.parametrize("name", ["llama", pytest.param("real", marks=pytest.mark.real)])
def test_stored_logits_decide_like_transformers_and_decisions_are_stored(name, tiny_models, request, tmp_path):
    import duckdb

    from geomap.analysis import load
    from geomap.analysis.api import decode
    from geomap.ingest.engine import ingest
    from geomap.store.query import final_logits
    from geomap.store.writer import PromptSpec

    model = request.getfixturevalue("real") if name == "real" else tiny_models[name]
    db = tmp_path / "d.duckdb"
    ingest(model, [PromptSpec("The storm is")], db, progress=False, index=False)
    con = duckdb.connect(str(db), read_only=True)
    info = load.prompt_info(con, 1)
    full = load.candidates(con, info, info.n_tokens - 1)
    stored_logits = final_logits(con, 1)
    con.close()
    assert full.complete
    sizes = [assert_matches_transformers(stored_logits, s) for s in [
        Strategy(temperature=1.7, top_p=0.9), Strategy(temperature=0.6, top_k=80, min_p=0.02),
        Strategy(temperature=1.4, min_p=0.005)]]
    assert max(sizes) > 50, sizes
    frame = decode(db, 1, Strategy(temperature=1.7, top_p=0.9, seed=4))
    assert frame.attrs["exact"] and len(frame) == sizes[0]
    approx = decode(db, 1, Strategy(temperature=1.7, top_p=0.9, seed=4), pos=1)
    assert not approx.attrs["exact"] and approx.attrs["cut_mass"] is None and len(approx) <= 50
    con = duckdb.connect(str(db), read_only=True)
    stored = con.execute("SELECT pos, exact, len(kept_ids), chosen_id, seed, source FROM decisions ORDER BY id"
                         ).fetchall()
    con.close()
    assert stored == [(info.n_tokens - 1, True, sizes[0], frame.attrs["chosen"]["id"], 4, "decode"),
                      (1, False, len(approx), approx.attrs["chosen"]["id"], 4, "decode")]

"""Unembedding geometry and direct logit attribution, read back from a real store, on every architecture."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from geomap.analysis.api import attribute, geometry
from geomap.ingest.engine import ingest
from geomap.store.query import final_logits
from geomap.store.writer import PromptSpec
from tests.tiny import ARCHS

PROMPTS = ["The storm is", "Paris is the capital of"]


@pytest.fixture(params=[*ARCHS, pytest.param("real", marks=pytest.mark.real)], scope="module")
def stored(request, tiny_models, tmp_path_factory):
    model = request.getfixturevalue("real") if request.param == "real" else tiny_models[request.param]
    db = tmp_path_factory.mktemp(f"geo-{request.param}") / "g.duckdb"
    ingest(model, [PromptSpec(t) for t in PROMPTS], db, progress=False)
    return model, db


def captured_logits(db, prompt_id: int) -> np.ndarray:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return final_logits(con, prompt_id).astype(np.float64)
    finally:
        con.close()


def capped(model, x):
    cap = model.anatomy.final_logit_softcap
    return np.tanh(np.asarray(x) / cap) * cap if cap else np.asarray(x)


def test_parts_sum_to_the_logit_and_heads_sum_to_attention(stored):
    model, db = stored
    for prompt_id in (1, 2):
        frame = attribute(db, prompt_id, None, loaded=model)  # the model's top-1
        a = frame.attrs
        assert a["token"]["id"] == int(np.argmax(captured_logits(db, prompt_id)))
        layer = frame[frame.level == "layer"]
        assert layer.value.sum() == pytest.approx(a["logit"], abs=1e-9)
        assert abs(float(capped(model, a["logit"])) - a["model_logit"]) <= 1e-3
        heads = frame[frame.level == "head"]
        assert len(heads) == model.anatomy.n_layers * (model.anatomy.n_heads + 1)
        for ell in range(model.anatomy.n_layers):
            attn = layer[(layer.component == "attn") & (layer.layer == ell)].value.sum()
            assert heads[heads.layer == ell].value.sum() == pytest.approx(attn, abs=1e-4)


def test_any_token_is_attributed_exactly(stored):
    model, db = stored
    logits = captured_logits(db, 1)
    con = duckdb.connect(str(db), read_only=True)
    vocab = dict(con.execute("SELECT token_id, text FROM vocab").fetchall())
    con.close()
    ranked = [t for t in np.argsort(-logits)[:40].tolist() if list(vocab.values()).count(vocab[t]) == 1]
    token = ranked[5]
    frame = attribute(db, 1, vocab[token], loaded=model)
    assert frame.attrs["token"]["id"] == token
    assert abs(float(capped(model, frame.attrs["logit"])) - logits[token]) <= 1e-3
    con = duckdb.connect(str(db), read_only=True)
    stored_sum = con.execute("SELECT sum(value) FROM attributions WHERE prompt_id = 1 AND token_id = ? "
                             "AND level = 'layer'", [token]).fetchall()[0][0]
    con.close()
    assert stored_sum == pytest.approx(frame.attrs["logit"], abs=1e-4)


def test_geometry_margin_and_nearest_directions(stored):
    model, db = stored
    frame = geometry(db, 1, contrast=(), loaded=model)
    a = frame.attrs
    logits = captured_logits(db, 1)
    cand = frame[frame.role == "candidate"]
    nearest = frame[frame.role == "nearest"]
    # The nearest unembedding directions (FAISS inner product) are the top logits.
    assert nearest.id.tolist()[:5] == cand.id.tolist()[:5]
    np.testing.assert_allclose(nearest["dot"], cand["dot"], rtol=1e-4, atol=1e-4)
    bias = model.anatomy.unembed_bias
    b = np.zeros(len(logits)) if bias is None else bias.detach().numpy()
    np.testing.assert_allclose(capped(model, cand["dot"] + b[cand.id]), logits[cand.id], rtol=1e-4, atol=1e-4)
    assert cand.id.iloc[0] == int(np.argmax(logits))
    assert a["margin"] == pytest.approx(a["direction_dot"] + a["bias_diff"], abs=1e-4)
    assert (frame.cosine.abs() <= 1 + 1e-6).all()
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM margins").fetchall()[0][0] == 1
    assert con.execute("SELECT count(*) FROM geometry WHERE role = 'nearest'").fetchall()[0][0] == len(nearest)
    con.close()


def test_layer_zero_finds_the_input_token_in_the_embedding(stored):
    model, db = stored
    frame = geometry(db, 1, layer=0, loaded=model)
    emb = frame[frame.role == "embedding"]
    con = duckdb.connect(str(db), read_only=True)
    last = con.execute("SELECT token_id FROM tokens WHERE prompt_id = 1 ORDER BY pos DESC LIMIT 1").fetchall()[0][0]
    con.close()
    if model.anatomy.model_type != "gpt2":  # GPT-2 adds a learned position vector to the embedding
        assert emb.id.iloc[0] == last and emb.cosine.iloc[0] == pytest.approx(1.0, abs=1e-5)


def test_contrast_token_must_be_one_vocabulary_entry(stored):
    from geomap.store.db import StoreError

    model, db = stored
    with pytest.raises(StoreError, match="not a single token"):
        geometry(db, 1, contrast=("no such token at all",), loaded=model)

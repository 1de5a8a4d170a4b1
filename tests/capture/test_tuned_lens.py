"""The tuned lens: starts as the logit lens, trains, stores translators that reproduce its statistics."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from geomap.analysis.tuned_api import tuned_lens
from geomap.capture import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.store.writer import PromptSpec

PROMPTS = [f"Prompt number {i} says the storm is coming over hill {i * 7}" for i in range(10)]


@pytest.fixture(params=["llama", pytest.param("real", marks=pytest.mark.real)])
def stored(request, tiny_models, tmp_path):
    model = request.getfixturevalue("real") if request.param == "real" else tiny_models[request.param]
    db = tmp_path / "t.duckdb"
    ingest(model, [PromptSpec(t) for t in PROMPTS], db, CaptureConfig(lens_positions="all"), progress=False,
           index=False)
    return model, db


def test_zero_steps_is_the_logit_lens(stored):
    model, db = stored
    frame = tuned_lens(db, 1, steps=0, loaded=model)
    np.testing.assert_allclose(frame["tuned_kl"], frame["logit_kl"], rtol=1e-5, atol=1e-6)
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("""SELECT t.kl_to_final, l.kl_to_final, t.top1_id, l.top1_id FROM tuned_lens_stats t
                          JOIN lens_stats l USING (prompt_id, pos, layer)""").fetchall()
    con.close()
    got = np.asarray([r[:2] for r in rows])
    np.testing.assert_allclose(got[:, 0], got[:, 1], rtol=1e-3, atol=1e-4)
    assert np.mean([r[2] == r[3] for r in rows]) > 0.99
    assert len(rows) == frame.attrs["positions"] * model.anatomy.n_layers


def test_training_stores_translators_that_reproduce_their_statistics(stored):
    model, db = stored
    frame = tuned_lens(db, 1, steps=40, loaded=model)
    a = frame.attrs
    assert a["train_prompts"] == 8 and a["heldout_prompts"] == 2
    assert (frame["steps"] > 0).any(), "training never improved on the logit lens on validation data"
    con = duckdb.connect(str(db), read_only=True)
    lens_id = a["lens_id"]
    layer = model.anatomy.n_layers // 2
    d, weight, bias, held_kl = con.execute("SELECT d, weight, bias, heldout_kl FROM tuned_lens WHERE id = ? AND "
                                           "layer = ?", [lens_id, layer]).fetchall()[0]
    w = np.frombuffer(weight, "<f4").reshape(d, d)
    b = np.frombuffer(bias, "<f4")
    prompt_id, pos, kl = con.execute("""SELECT prompt_id, pos, kl_to_final FROM tuned_lens_stats
                                        WHERE lens_id = ? AND layer = ? AND heldout ORDER BY prompt_id, pos LIMIT 1""",
                                     [lens_id, layer]).fetchall()[0]
    h = np.asarray(con.execute("SELECT vec FROM states WHERE prompt_id = ? AND pos = ? AND layer = ?",
                               [prompt_id, pos, layer]).fetchall()[0][0], np.float32)
    final = np.asarray(con.execute("SELECT vec FROM states WHERE prompt_id = ? AND pos = ? AND layer = ?",
                                   [prompt_id, pos, model.anatomy.n_layers]).fetchall()[0][0], np.float32)
    mean_kl = con.execute("SELECT avg(kl_to_final) FROM tuned_lens_stats WHERE lens_id = ? AND layer = ? AND heldout",
                          [lens_id, layer]).fetchall()[0][0]
    con.close()
    import torch

    from geomap.analysis.tuned_lens import final_logprobs

    with torch.no_grad():
        logq = final_logprobs(model, torch.as_tensor(h + h @ w + b)[None])[0]
        logp = final_logprobs(model, torch.as_tensor(final)[None])[0]
    assert float((logq.exp() * (logq - logp)).sum()) == pytest.approx(kl, rel=1e-3, abs=1e-4)
    assert mean_kl == pytest.approx(held_kl, rel=1e-4)

"""Capture profiles: the "states" profile stores the residual stream and the final readout, equal to the full one."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from geomap.capture import CaptureConfig, capture
from geomap.ingest.engine import ingest
from geomap.store.writer import PromptSpec

TEXTS = ["The storm is", "Paris is the capital of", "def add(a, b):\n    return"]
STATES = CaptureConfig(profile="states")


def test_default_profile_keeps_the_old_keys():
    assert "profile" not in CaptureConfig().to_json() and '"profile":"states"' in STATES.to_json()
    with pytest.raises(ValueError, match="profile"):
        CaptureConfig(profile="everything")


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "gpt2", pytest.param("real", marks=pytest.mark.real)])
def test_states_profile_equals_the_full_capture(name, tiny_models, request):
    model = request.getfixturevalue("real") if name == "real" else tiny_models[name]
    for full, states in zip(capture(model, TEXTS), capture(model, TEXTS, STATES)):
        assert states.profile == "states" and states.stream.attn.shape[0] == 0 and len(states.lens.layers) == 0
        np.testing.assert_array_equal(states.stream.resid, full.stream.resid)
        np.testing.assert_array_equal(states.final.ids, full.final.ids)
        np.testing.assert_allclose(states.final.entropy, full.final.entropy, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(states.last_logits, full.last_logits, rtol=1e-5, atol=1e-5)


def test_states_profile_stores_states_and_readout_only(tiny_models, tmp_path):
    model = tiny_models["llama"]
    full_db, states_db = tmp_path / "f.duckdb", tmp_path / "s.duckdb"
    ingest(model, [PromptSpec(t) for t in TEXTS], full_db, progress=False)
    ingest(model, [PromptSpec(t) for t in TEXTS], states_db, STATES, progress=False)
    counts = {}
    for db in (full_db, states_db):
        con = duckdb.connect(str(db), read_only=True)
        counts[db] = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]  # noqa: S608
                      for t in ("prompts", "tokens", "states", "next_token", "contributions", "attention", "lens",
                                "final_logits", "norms", "mlp_features")}
        vectors = con.execute("SELECT vec FROM states ORDER BY prompt_id, layer, pos").fetchall()
        counts[db]["vec"] = np.asarray([v[0] for v in vectors])
        counts[db]["journey"] = con.execute("SELECT text, top1_id, top1_prob FROM journey ORDER BY text").fetchall()
        con.close()
    full, states = counts[full_db], counts[states_db]
    for table in ("prompts", "tokens", "states", "next_token"):
        assert states[table] == full[table] > 0, table
    for table in ("contributions", "attention", "lens", "final_logits", "norms", "mlp_features"):
        assert states[table] == 0 < full[table], table
    np.testing.assert_array_equal(states["vec"], full["vec"])
    assert [r[:2] for r in states["journey"]] == [r[:2] for r in full["journey"]]

"""Interventions stored as data: the ledger, the delta view, the effects, idempotent reruns, kill safety, the CLI."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from geomap.analysis.interventions import counterfactual, effects, journey_diff, trace_grid
from geomap.capture import CaptureConfig, capture
from geomap.faults import SWEEP_POINTS
from geomap.ingest.interventions import sweep
from geomap.intervene import Edits, Noise, Site, Spec, prepare
from geomap.intervene.engine import edits_for
from geomap.intervene.spec import vector_bytes
from tests.forked import geomap

TEXT, OTHER = "The storm is coming over the hills", "The storm is moving over the hills"


def _specs(loaded):
    n_layers = loaded.anatomy.n_layers
    return [*[Spec("patch", TEXT, Site("resid", layer), (pos,), source=OTHER) for layer in range(n_layers + 1)
              for pos in (-4, -1)],
            Spec("trace", TEXT, Site("mlp", 1), (-1,), noise=Noise((1, 2), 3.0, 5)),
            Spec("steer", TEXT, Site("resid", 1), (-1,), vector=vector_bytes(np.ones(loaded.anatomy.d_model)),
                 vector_label="ones", coefficient=2.0)]


def _counts(db) -> dict:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
                for t in ("interventions", "intervention_states", "effects", "runs", "prompts")}
    finally:
        con.close()


def test_clean_plus_delta_is_the_intervened_journey_and_reruns_store_nothing(tiny_models, tmp_path):
    loaded, db = tiny_models["qwen2"], tmp_path / "store.duckdb"
    specs = _specs(loaded)
    first = sweep(loaded, specs, db, name="s", batch_size=5)
    assert first.stored == len(specs) and first.skipped == 0
    before = _counts(db)
    again = sweep(loaded, specs, db, name="s", batch_size=3)
    assert again.stored == 0 and again.ids == first.ids and _counts(db) == before
    base = prepare(loaded, specs)
    for spec, iid in zip(specs, first.ids):
        _, edits, first_layer, first_pos = edits_for(loaded, spec, base)
        with Edits(loaded.anatomy, [edits]):
            (j,) = capture(loaded, [TEXT], CaptureConfig())
        frame, vectors = counterfactual(db, iid)
        np.testing.assert_allclose(vectors, j.stream.resid, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(frame.norm.to_numpy().reshape(vectors.shape[:2]),
                                   np.linalg.norm(j.stream.resid, axis=-1), rtol=1e-4)
        changed = frame.changed.to_numpy().reshape(vectors.shape[:2])
        assert not changed[:first_layer].any() and not changed[:, :first_pos].any()
        assert changed[first_layer:, first_pos:].all()


def test_effects_of_a_patch_into_itself_are_nothing(tiny_models, tmp_path):
    loaded, db = tiny_models["gpt2"], tmp_path / "store.duckdb"
    specs = [Spec("patch", TEXT, Site("resid", layer), (-1,), source=TEXT) for layer in range(3)]
    sweep(loaded, specs, db, targets=[" the"], name="self")
    frame = effects(db, "self")
    assert len(frame) == 3 and (frame.token == " the").all()
    assert np.allclose(frame.prob_change, 0, atol=1e-6) and np.allclose(frame.kl, 0, atol=1e-6)
    assert frame.first_flip_layer.isna().all() and not frame.top1_changed.any()
    assert (frame["rank"] == frame.clean_rank).all()
    grid = trace_grid(db, "self")
    assert list(grid.layer) == [0, 1, 2] and (grid.pos == len(loaded.tokenizer(TEXT)["input_ids"]) - 1).all()
    diff = journey_diff(db, int(frame.intervention_id.iloc[0]))
    assert np.allclose(diff.cosine, 1.0, atol=1e-6)


def test_effects_match_the_model(tiny_models, tmp_path):
    loaded, db = tiny_models["llama"], tmp_path / "store.duckdb"
    spec = Spec("patch", TEXT, Site("resid", 1), (-1,), source=OTHER)
    summary = sweep(loaded, [spec], db, targets=[" the", " over"], name="one")
    frame = effects(db, "one")
    base = prepare(loaded, [spec])
    _, edits, _, _ = edits_for(loaded, spec, base)
    with Edits(loaded.anatomy, [edits]):
        (j,) = capture(loaded, [TEXT], CaptureConfig())
    probs = np.exp(j.last_logits - j.last_logits.max())
    probs /= probs.sum()
    for row in frame.itertuples():
        assert row.intervention_id == summary.ids[0]
        assert row.prob == pytest.approx(probs[row.token_id], rel=1e-4)
        assert row.rank == int((j.last_logits > j.last_logits[row.token_id]).sum()) + 1


@pytest.mark.parametrize("point", [*SWEEP_POINTS, "intervene.batch_committed@2", "run.started"])
def test_a_killed_sweep_rerun_gives_the_uninterrupted_store(tiny_dirs, tmp_path, point):
    model = str(tiny_dirs["llama"])
    args = ["intervene", "patch", TEXT, "--source", OTHER, "--layer", "all", "--pos", "-3:", "--model", model,
            "--batch-size", "4", "--name", "k"]
    reference = tmp_path / "ref.duckdb"
    assert geomap(*args, "--db", str(reference)).status == 0
    db = tmp_path / "killed.duckdb"
    killed = geomap(*args, "--db", str(db), env={"GEOMAP_KILL_AT": point})
    assert killed.status == -9
    done = geomap(*args, "--db", str(db))
    assert done.status == 0, done.stderr

    def snapshot(path):
        con = duckdb.connect(str(path), read_only=True)
        try:
            q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
            return {"ledger": q("SELECT id, key, run_id, prompt_id, layer, positions FROM interventions ORDER BY id"),
                    "delta": q("SELECT intervention_id, pos, layer, round(norm, 4) FROM intervention_states "
                               "ORDER BY ALL"),
                    "effects": q("SELECT intervention_id, token_id, round(prob, 6) FROM effects ORDER BY ALL"),
                    "runs": q("SELECT id, status, pipeline FROM runs ORDER BY id")}
        finally:
            con.close()

    assert snapshot(db) == snapshot(reference)


def test_cli_errors_are_one_line_and_store_nothing(tiny_dirs, tmp_path):
    db = tmp_path / "s.duckdb"
    model = str(tiny_dirs["gpt2"])
    for args in (["patch", TEXT, "--model", model, "--layer", "99", "--source", OTHER],
                 ["patch", TEXT, "--model", model, "--layer", "x", "--source", OTHER],
                 ["steer", TEXT, "--model", model, "--layer", "1"],
                 ["trace", TEXT, "--model", model, "--subject", "volcano"],
                 ["ablate", TEXT, "--model", model, "--how", "resample"]):
        done = geomap("intervene", *args, "--db", str(db))
        assert done.status == 2, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert not db.exists() or _counts(db)["interventions"] == 0


def test_cli_trace_and_steer(tiny_dirs, tmp_path):
    db = tmp_path / "s.duckdb"
    model = str(tiny_dirs["gemma3_text"])
    done = geomap("intervene", "trace", TEXT, "--subject", "storm", "--model", model, "--db", str(db), "--name", "t",
                  "--target", " the")
    assert done.status == 0, done.stderr
    grid = trace_grid(db, "t")
    n = len(duckdb.connect(str(db), read_only=True).execute("SELECT * FROM tokens WHERE prompt_id = 1").fetchall())
    assert len(grid) == 4 * n  # every boundary of the 3-layer model × every position
    done = geomap("intervene", "steer", TEXT, "--tokens", " the", " over", "--layer", "1", "--pos", "-1",
                  "--alpha", "0,2,4", "--model", model, "--db", str(db), "--name", "st", "--json")
    assert done.status == 0, done.stderr
    frame = effects(db, "st")
    assert sorted(frame.coefficient.unique()) == [0, 2, 4]
    zero = frame[frame.coefficient == 0]
    assert np.allclose(zero.prob_change, 0, atol=1e-5)


def _pipeline(tmp_path, model, extra: str):
    (tmp_path / "p.txt").write_text(f"{TEXT}\n{OTHER}\n")
    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\nmodel = "{model}"\nstore = "{tmp_path / "s.duckdb"}"\n'
                    f'[[sources]]\npath = "p.txt"\n{extra}')
    return path


def test_a_pipeline_runs_its_interventions_once(tiny_dirs, tmp_path):
    extra = (f'[[interventions]]\nname = "tr"\noperation = "trace"\nprompt = "{TEXT}"\ncorrupt = "{OTHER}"\n'
             'layers = [0, 2]\npositions = "-2:"\ntargets = [" the"]\n')
    path = _pipeline(tmp_path, tiny_dirs["qwen3"], extra)
    done = geomap("run", str(path))
    assert done.status == 0, done.stderr
    assert "interventions 'tr': 4 stored" in done.stderr
    again = geomap("run", str(path))
    assert again.status == 0 and "0 stored, 4 already stored" in again.stderr
    grid = trace_grid(tmp_path / "s.duckdb", "tr")
    assert sorted(zip(grid.layer, grid.pos)) == sorted((layer, p) for layer in (0, 2) for p in (grid.pos.max() - 1,
                                                                                               grid.pos.max()))


@pytest.mark.parametrize(("extra", "message"), [
    ('[[interventions]]\noperation = "poke"\nprompt = "x"\n', "operation = 'poke' is not allowed"),
    ('[[interventions]]\noperation = "steer"\nprompt = "x"\nalpha = [1]\n', "unknown key 'alpha'"),
    ('[[interventions]]\noperation = "trace"\n', "missing key 'prompt'"),
    ('[[interventions]]\noperation = "patch"\nprompt = "x"\nlayers = "some"\n', "layers = 'some' is not allowed"),
])
def test_bad_intervention_entries_are_one_line_errors(tiny_dirs, tmp_path, extra, message):
    path = _pipeline(tmp_path, tiny_dirs["qwen3"], extra)
    done = geomap("run", str(path))
    assert done.status == 2 and message in done.stderr and "[[interventions]] #1" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "s.duckdb").exists()


def _plain_lens(unembed, rows, targets):
    """The lens the slow way: every row's whole vocabulary of logits, its maximum, logsumexp and counts."""
    import torch

    logits = unembed.logits(torch.from_numpy(np.ascontiguousarray(rows)))
    own = logits.gather(1, torch.from_numpy(targets))
    ranks = np.stack([(logits > own[:, j:j + 1]).sum(-1).numpy() + 1 for j in range(targets.shape[1])], -1)
    top = logits.max(-1)
    return top.indices.numpy(), torch.exp(top.values - torch.logsumexp(logits, -1)).numpy(), ranks


@pytest.mark.parametrize("block", [1 << 20, 300])
def test_the_blocked_lens_scan_is_the_plain_lens(tiny_models, monkeypatch, block):
    """Top-1, its probability and target ranks from the blocked pass equal the whole-vocabulary computation."""
    from geomap.capture.lens import Unembed
    from geomap.intervene import scan

    monkeypatch.setattr(scan, "_BLOCK_FLOATS", block)  # 300: blocks of a few dozen tokens, targets in several
    loaded = tiny_models["llama"]
    base = prepare(loaded, [Spec("ablate", TEXT, Site("resid", 1), (0,), ablation="zero")])
    rows = base[TEXT].resid.reshape(-1, loaded.anatomy.d_model)
    vocab = loaded.anatomy.vocab_size
    targets = np.stack([np.arange(len(rows)) * 7 % vocab, vocab - 1 - np.arange(len(rows)) % 5], -1)
    unembed = Unembed(loaded.anatomy)
    got = scan.lens_rows(unembed, rows, targets)
    ids, probs, ranks = _plain_lens(unembed, rows, targets)
    np.testing.assert_array_equal(got.top1_id, ids)
    np.testing.assert_allclose(got.top1_prob, probs, rtol=1e-5)
    np.testing.assert_array_equal(got.ranks, ranks)


def test_the_lens_of_unchanged_rows_is_the_reference_runs(tiny_models):
    """Below `last_from` the last position is the reference run's, and repeated rows are measured once: the lens
    stored for every boundary equals a plain lens pass over the outcome's own rows."""
    from geomap.intervene import run_specs
    from geomap.intervene.measure import Measure

    loaded = tiny_models["llama"]
    n_bounds = loaded.anatomy.n_layers + 1
    specs = [*[Spec("trace", TEXT, Site(kind, layer), (pos,), noise=Noise((1, 2), 3.0, 5))
               for kind, top in (("resid", n_bounds), ("mlp", n_bounds - 1)) for layer in range(top)
               for pos in (-1, 3, 0)],
             *[Spec("patch", TEXT, Site("resid", layer), (pos,), source=OTHER) for layer in range(n_bounds)
               for pos in (-1, 2)],
             Spec("ablate", TEXT, Site("head", 1, 0), (2,), ablation="zero")]
    base = prepare(loaded, specs)
    target = loaded.tokenizer(" the", add_special_tokens=False)["input_ids"]
    measure = Measure(loaded, base, target)
    outcomes = [o for batch in run_specs(loaded, specs, base, 7) for o in batch]
    assert {o.last_from for o in outcomes} > {0, 1}  # some rows are taken from the reference
    got = [m for start in range(0, len(outcomes), 7) for m in measure.batch(outcomes[start:start + 7])]
    for outcome, measured in zip(outcomes, got):
        ids, probs, ranks = _plain_lens(measure.unembed, outcome.resid[:, -1], np.tile(target, (n_bounds, 1)))
        last = measured.delta["pos"] == len(base[TEXT].ids) - 1
        np.testing.assert_array_equal(measured.delta["top1_id"][last], ids)
        np.testing.assert_allclose(measured.delta["top1_prob"][last], probs, rtol=1e-4)
        (effect,) = measured.effects
        assert effect["lens_ranks"] == ranks[:, 0].tolist()
        assert effect["lens_ranks"][-1] == effect["rank"]  # the lens at the last boundary is the model's output
    changed = sum(n_bounds - o.last_from for o in outcomes)
    assert measure.scanned < changed  # restoring position 0 (before the noise) repeats the corrupted run's rows

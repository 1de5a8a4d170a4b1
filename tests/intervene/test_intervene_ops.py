"""Interventions on tiny models of every architecture: the invariants that say the hooks edit exactly what they name.

Each test runs the model through `geomap.intervene` and checks a property that would fail if a hook edited the
wrong row, position, layer or head, or if batching mixed rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geomap.capture import CaptureConfig, capture
from geomap.intervene import Edits, InterventionError, Noise, Site, Spec, prepare, run_specs
from geomap.intervene.engine import baselines, edits_for
from geomap.intervene.spec import vector_bytes

TEXT, OTHER = "The storm is coming over the hills", "The capital of France is Paris"


def _close(a, b) -> None:
    """Equal to float32 rounding (batches of different sizes take different GEMM paths)."""
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def _run(loaded, specs, batch_size=4):
    base = prepare(loaded, specs)
    return base, [o for batch in run_specs(loaded, specs, base, batch_size) for o in batch]


def _grid(loaded, text, source, kind="resid"):
    """Every layer × every (end-aligned) position both prompts have."""
    n = min(len(loaded.tokenizer(t)["input_ids"]) for t in (text, source))
    top = loaded.anatomy.n_layers + (1 if kind == "resid" else 0)
    return [Spec("patch", text, Site(kind, layer), (pos,), source=source) for layer in range(top)
            for pos in range(-n, 0)]


def test_patching_a_run_into_itself_changes_nothing(tiny):
    specs = [*_grid(tiny, TEXT, TEXT), *_grid(tiny, TEXT, TEXT, "attn")[::4], *_grid(tiny, TEXT, TEXT, "mlp")[1::4]]
    specs += [Spec("patch", TEXT, Site("head", 1, h), (-1,), source=TEXT) for h in range(tiny.anatomy.n_heads)]
    base, outcomes = _run(tiny, specs, batch_size=7)
    clean = base[TEXT]
    for o in outcomes:
        _close(o.resid, clean.resid)
        _close(o.logits, clean.logits)


def test_patching_every_layer_and_position_reproduces_the_source(tiny):
    base = prepare(tiny, [Spec("patch", TEXT, Site("resid", 0), (0,), source=OTHER)])
    n_t, n_s = len(base[TEXT].ids), len(base[OTHER].ids)
    n = min(n_t, n_s)
    # Every boundary at every (end-aligned) position of the shorter prompt, in one row.
    spec = Spec("patch", TEXT, Site("resid", 0), tuple(range(-n, 0)), source=OTHER)
    ids, _, _, _ = edits_for(tiny, spec, base)
    rows = []
    from geomap.intervene.hooks import Edit
    for layer in range(tiny.anatomy.n_layers + 1):
        value = torch.from_numpy(base[OTHER].resid[layer][n_s - n:])
        rows.append(Edit(Site("resid", layer), list(range(n_t - n, n_t)), value))
    from geomap.intervene.engine import forward
    edits, logits = forward(tiny, [ids], [rows])
    resid = torch.stack(edits.resid).numpy()[:, 0]
    _close(resid[:, n_t - n:], base[OTHER].resid[:, n_s - n:])
    _close(logits[0], base[OTHER].logits)


def test_steer_with_zero_alpha_is_the_identity_and_other_alphas_move_the_run(tiny):
    d = tiny.anatomy.d_model
    direction = vector_bytes(np.random.default_rng(0).standard_normal(d))
    specs = [Spec("steer", TEXT, Site("resid", 1), (-2, -1), vector=direction, vector_label="random", coefficient=c)
             for c in (0.0, 4.0)]
    base, (zero, four) = _run(tiny, specs)
    _close(zero.resid, base[TEXT].resid)
    _close(zero.logits, base[TEXT].logits)
    n = len(base[TEXT].ids)
    added = four.resid[1, n - 2:] - base[TEXT].resid[1, n - 2:]
    _close(added, np.tile(4 * np.frombuffer(direction, np.float32), (2, 1)))
    _close(four.resid[:, : n - 2], base[TEXT].resid[:, : n - 2])  # causal
    assert np.abs(four.logits - base[TEXT].logits).max() > 1e-3


def test_zero_ablating_a_head_then_patching_its_clean_output_back_restores_the_run(tiny):
    layer, head = 1, 2
    site = Site("head", layer, head)
    base = baselines(tiny, [TEXT], (site,))
    clean = base[TEXT]
    n = len(clean.ids)
    from geomap.intervene.engine import forward
    from geomap.intervene.hooks import Edit
    hd = tiny.anatomy.head_dim
    ablated, _ = forward(tiny, [clean.ids], [[Edit(site, list(range(n)), torch.zeros(hd))]])
    # Ablate the head, then set it back to its clean value, in the same row (hooks in order of the list).
    both, logits = forward(tiny, [clean.ids], [[Edit(site, list(range(n)), torch.zeros(hd)),
                                               Edit(site, list(range(n)), clean.values[site])]])
    resid = torch.stack(both.resid).numpy()[:, 0]
    np.testing.assert_array_equal(resid, clean.resid)
    np.testing.assert_array_equal(logits[0], clean.logits)
    assert np.abs(torch.stack(ablated.resid).numpy()[layer + 1, 0] - clean.resid[layer + 1]).max() > 1e-4


def test_batched_rows_equal_one_row_at_a_time(tiny):
    specs = _grid(tiny, TEXT, OTHER)[::3]
    _, together = _run(tiny, specs, batch_size=len(specs))
    _, alone = _run(tiny, specs, batch_size=1)
    for a, b in zip(together, alone):
        _close(a.resid, b.resid)
        _close(a.logits, b.logits)


def test_a_patch_changes_nothing_before_its_layer_or_position(tiny):
    specs = [Spec("patch", TEXT, Site("resid", 2), (3,), source=OTHER),
             Spec("patch", TEXT, Site("mlp", 1), (2,), source=OTHER),
             Spec("trace", TEXT, Site("resid", 2), (4,), noise=Noise((1, 2), 3.0, 7))]
    base, outcomes = _run(tiny, specs)
    clean = base[TEXT].resid
    for o in outcomes:
        _close(o.resid[: o.first_layer], clean[: o.first_layer])
        _close(o.resid[:, : o.first_pos], clean[:, : o.first_pos])
        assert np.abs(o.resid[o.first_layer + 1:, o.first_pos:] - clean[o.first_layer + 1:, o.first_pos:]).max() > 0


def test_noise_is_seeded(tiny):
    specs = [Spec("trace", TEXT, Site("resid", 1), (-1,), noise=Noise((1,), 3.0, seed)) for seed in (1, 1, 2)]
    _, (a, b, c) = _run(tiny, specs)
    np.testing.assert_array_equal(a.resid, b.resid)
    assert np.abs(a.resid - c.resid).max() > 0


def test_clean_plus_edits_equals_a_full_capture_under_the_same_edits(tiny):
    spec = Spec("patch", TEXT, Site("attn", 1), (-2,), source=OTHER)
    base, (o,) = _run(tiny, [spec])
    ids, edits, _, _ = edits_for(tiny, spec, base)
    with Edits(tiny.anatomy, [edits]):
        (j,) = capture(tiny, [TEXT], CaptureConfig())
    _close(j.stream.resid, o.resid)
    _close(j.last_logits, o.logits)


@pytest.mark.parametrize("bad", [
    dict(operation="patch", site=Site("resid", 99), positions=(0,), source=OTHER),
    dict(operation="patch", site=Site("head", 0, 99), positions=(0,), source=OTHER),
    dict(operation="patch", site=Site("resid", 0), positions=(99,), source=OTHER),
    dict(operation="steer", site=Site("resid", 0), positions=(0,), vector=vector_bytes(np.zeros(3))),
])
def test_bad_specs_raise_one_clear_error(tiny_models, bad):
    loaded = tiny_models["llama"]
    with pytest.raises(InterventionError):
        spec = Spec(prompt=TEXT, **bad)
        base = prepare(loaded, [spec])
        list(run_specs(loaded, [spec], base))

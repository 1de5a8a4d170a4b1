"""Referees: geomap's activation patching against TransformerLens v4's and nnsight's, on the real models.

Every peer wraps the same weights offline. The metric is the last position's logits of the answer token and of its
rival (" Paris" vs " Rome"), patching the clean prompt's activations into the corrupted prompt's run: the residual
stream at every layer × position, one head's output (its slice of the input of W_O) and one MLP output.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from geomap.intervene import Site, Spec, prepare, run_specs

tl_bridge = pytest.importorskip("transformer_lens.model_bridge", reason="optional peer extra (pip install .[peer])")
nnsight = pytest.importorskip("nnsight", reason="optional peer extra (pip install .[peer])")
from transformer_lens import patching  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.peer]
CLEAN, CORRUPT = "The capital of France is", "The capital of Italy is"
ANSWERS = (" Paris", " Rome")


@pytest.fixture(scope="module", params=["gemma-3-270m", "smollm2-135m"])
def model(request, real):
    from transformers.utils import logging

    from geomap.models import load_model

    logging.set_verbosity_error()
    return real if request.param == "gemma-3-270m" else load_model(request.param, device="cpu")


@pytest.fixture(scope="module")
def setup(model):
    tok = model.tokenizer
    clean, corrupt = (torch.tensor(tok(t)["input_ids"])[None] for t in (CLEAN, CORRUPT))
    assert clean.shape == corrupt.shape  # the pair tokenizes to the same length on both models
    answer = [tok(a, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    assert all(len(a) == 1 for a in answer)
    return clean, corrupt, [a[0] for a in answer]


def _geomap(model, sites_positions, answer):
    specs = [Spec("patch", CORRUPT, site, (pos,), source=CLEAN) for site, pos in sites_positions]
    base = prepare(model, specs)
    out = [o.logits[answer] for batch in run_specs(model, specs, base, batch_size=16) for o in batch]
    return np.stack(out)


@pytest.fixture(scope="module")
def bridge(model):
    from transformers import AutoModelForCausalLM

    # The bridge rewires the model it wraps (eager attention, wrapped submodules): give it its own copy.
    copy = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
    return tl_bridge.TransformerBridge.boot_transformers(model.name, hf_model=copy, tokenizer=model.tokenizer,
                                                         device="cpu", dtype=torch.float32)


def _metric(answer):
    return {name: (lambda logits, t=t: logits[0, -1, t]) for name, t in zip(("a", "b"), answer)}


def test_residual_patching_per_layer_and_position_equals_transformer_lens(model, setup, bridge):
    import pandas as pd

    clean, corrupt, answer = setup
    n_layers, n = model.anatomy.n_layers, clean.shape[1]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(clean)
        # Every layer at the subject's and the last position, and every position at the middle layer.
        cells = sorted({(layer, pos) for layer in range(n_layers) for pos in (4, n - 1)}
                       | {(n_layers // 2, pos) for pos in range(n)})
        index = pd.DataFrame(cells, columns=["layer", "pos"])
        tl = patching.get_act_patch_resid_pre(bridge, corrupt, cache, _metric(answer), index_axis_names=None,
                                              index_df=index).values  # (metric, cells)
    ours = _geomap(model, [(Site("resid", layer), pos) for layer, pos in cells], answer)
    theirs = tl.numpy().T
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=2e-4)
    assert np.ptp(ours[:, 0]) > 0.5  # the sweep moves the answer: the comparison is not between constants


def test_head_and_mlp_patching_equal_transformer_lens(model, setup, bridge):
    import pandas as pd

    clean, corrupt, answer = setup
    layers = [1, model.anatomy.n_layers // 2, model.anatomy.n_layers - 1]
    n = clean.shape[1]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(clean)
        heads = pd.DataFrame([(layer, pos, head) for layer in layers for pos in (n - 1, 4) for head in (0, 2)],
                             columns=["layer", "pos", "head_index"])
        tl_head = patching.get_act_patch_attn_head_out_by_pos(bridge, corrupt, cache, _metric(answer),
                                                              index_axis_names=None, index_df=heads).values
        mlps = pd.DataFrame([(layer, pos) for layer in layers for pos in (n - 1, 4)], columns=["layer", "pos"])
        tl_mlp = patching.get_act_patch_mlp_out(bridge, corrupt, cache, _metric(answer),
                                              index_axis_names=None, index_df=mlps).values
    ours_head = _geomap(model, [(Site("head", int(r.layer), int(r.head_index)), int(r.pos))
                                for r in heads.itertuples()], answer)
    ours_mlp = _geomap(model, [(Site("mlp", int(r.layer)), int(r.pos)) for r in mlps.itertuples()], answer)
    np.testing.assert_allclose(ours_head, tl_head.numpy().T, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(ours_mlp, tl_mlp.numpy().T, rtol=1e-4, atol=2e-4)


def _envoy(lm, path: str, layer: int):
    """The nnsight envoy of a registry path inside decoder layer ``layer``."""
    node = lm
    layers_path = "model.layers"
    for part in layers_path.split("."):
        node = getattr(node, part)
    node = node[layer]
    for part in path.split("."):
        node = getattr(node, part)
    return node


def test_patching_equals_nnsight(model, setup):
    clean, corrupt, answer = setup
    a = model.anatomy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = nnsight.LanguageModel(model.model, tokenizer=model.tokenizer)
    n, hd = clean.shape[1], a.head_dim
    layer, head = a.n_layers // 2, 1
    base = prepare(model, [Spec("patch", CORRUPT, Site("head", layer, head), (0,), source=CLEAN),
                           Spec("patch", CORRUPT, Site("mlp", layer), (0,), source=CLEAN)])
    clean_run = base[CLEAN]
    cases = []
    for pos in range(n):
        cases.append((Site("resid", layer), pos))
        cases.append((Site("head", layer, head), pos))
        cases.append((Site("mlp", layer), pos))
    theirs = []
    for site, pos in cases:
        with torch.no_grad(), lm.trace(corrupt):
            if site.kind == "resid":
                x = lm.model.layers[layer].input
                x[0, pos] = torch.from_numpy(clean_run.resid[layer][pos])
            elif site.kind == "head":
                x = _envoy(lm, f"{a.spec.attn}.{a.spec.o_proj}", layer).input
                x[0, pos, head * hd:(head + 1) * hd] = clean_run.values[site][pos]
            else:
                out = _envoy(lm, a.spec.mlp_add, layer).output
                out[0, pos] = clean_run.values[site][pos]
            logits = lm.output.logits.save()
        theirs.append(logits[0, -1, answer].float().numpy())
    ours = _geomap(model, cases, answer)
    np.testing.assert_allclose(ours, np.stack(theirs), rtol=1e-4, atol=2e-4)

"""Cross-check against a peer: TransformerLens v4's TransformerBridge wrapping the same weights, offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geomap.capture import CaptureConfig, capture

tl_bridge = pytest.importorskip("transformer_lens.model_bridge", reason="optional peer extra (pip install .[peer])")

pytestmark = [pytest.mark.real, pytest.mark.peer]
PROMPTS = ["The storm is", "The capital of France is"]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-12)).max())


@pytest.fixture(scope="module")
def bridge(real):
    from transformers import AutoModelForCausalLM

    # The bridge rewires the model it wraps (eager attention, wrapped submodules): give it its own copy.
    copy = AutoModelForCausalLM.from_pretrained(real.path, dtype=torch.float32).eval()
    return tl_bridge.TransformerBridge.boot_transformers("gemma-3-270m", hf_model=copy, tokenizer=real.tokenizer,
                                                         device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("text", PROMPTS)
def test_transformer_lens_agrees_on_residuals_and_attention(real, bridge, text):
    (j,) = capture(real, [text], CaptureConfig(attn_positions="all"))
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(torch.tensor(j.tokens.ids)[None])
    n_layers = real.anatomy.n_layers
    for layer in range(n_layers):
        assert rel_err(j.stream.resid[layer], cache[f"blocks.{layer}.hook_resid_pre"][0]) <= 1e-4
        assert rel_err(j.stream.attn[layer], cache[f"blocks.{layer}.hook_attn_out"][0]) <= 1e-4
        assert rel_err(j.stream.mlp[layer], cache[f"blocks.{layer}.hook_mlp_out"][0]) <= 1e-4
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].numpy()  # (H, T, T)
        np.testing.assert_allclose(j.attention.weights[layer], pattern, atol=1e-5)
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][0].numpy()
        allowed = pattern > 0
        np.testing.assert_allclose(j.attention.scores[layer][allowed], scores[allowed], rtol=1e-4, atol=1e-4)
    assert rel_err(j.stream.resid[n_layers], cache[f"blocks.{n_layers - 1}.hook_resid_post"][0]) <= 1e-4
    assert rel_err(j.last_logits, logits[0, -1]) <= 1e-4

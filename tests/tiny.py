"""Tiny random-weight models of every supported architecture, built from local configs (no network)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "The storm is coming over the hills and the rain is moving east.",
    "The capital of France is Paris; the capital of Italy is Rome.",
    "def add(a, b):\n    return a + b  # code and syntax",
    "Once upon a time a small fox found a key under the bridge.",
    "Water boils at 100 degrees Celsius at sea level. Naïve café: déjà vu, 東京, 🌩️.",
] * 20

ARCHS = ["llama", "qwen2", "qwen3", "gemma3_text", "gpt2"]


def build_tokenizer():
    """A byte-level BPE tokenizer (vocab ~400) that adds BOS, like Gemma's does."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def build_config(arch: str, vocab: int):
    """A 2-3 layer config with grouped-query attention where the architecture has it."""
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if arch == "gemma3_text":
        return Gemma3TextConfig(**{**common, "num_key_value_heads": 1}, head_dim=16, query_pre_attn_scalar=16,
                                sliding_window=4, layer_types=["sliding_attention", "sliding_attention",
                                                               "full_attention"])
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                          scale_attn_by_inverse_layer_idx=True, bos_token_id=1, eos_token_id=2)
    raise ValueError(arch)


def build_model_dir(arch: str, root: Path, tokenizer) -> Path:
    """Save a seeded random model of ``arch`` (norm gains and biases perturbed too) with the tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(sum(map(ord, arch)))
    model = AutoModelForCausalLM.from_config(build_config(arch, len(tokenizer)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    out = root / arch
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out

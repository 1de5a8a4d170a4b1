"""A model's identity without its weights: config, tokenizer and an empty (meta-device) module.

An ingestion driver that hands the forward passes to workers (the Ray engine) still needs what a run row, a
prompt key and the stored vocabulary are made of: the architecture, the sizes, the weights hash and the
tokenizer. A skeleton gives exactly that, in a second and without the weights' memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from geomap.models.loading import LoadedModel, not_found, resolve_dtype, resolve_model_path, source_kwargs


def skeleton_model(name: str, device: str = "cpu", dtype: str | torch.dtype | None = None) -> LoadedModel:
    """A `LoadedModel` whose module lives on the meta device: sizes and identity, no weights.

    Args:
        name: Preset, local model directory or hub id (presets are converted on first use, as by `load_model`).
        device: The device the workers will run on; it decides the default dtype recorded on the run.
        dtype: The workers' weights dtype (default float32 on CPU, bfloat16 on an accelerator).

    Returns:
        A `LoadedModel` whose ``anatomy``, ``weights_hash`` and ``tokenizer`` equal a real load's; its
        ``model`` cannot run.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_path(name)
    kwargs = source_kwargs(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        config = AutoConfig.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise not_found(name, f"transformers could not read it ({str(exc).splitlines()[0]})") from exc
    torch_dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    skeleton = LoadedModel(name, Path(source), model.eval(), tokenizer, "meta", torch_dtype)
    _ = skeleton.anatomy  # an unknown architecture fails here, before any worker starts
    return skeleton

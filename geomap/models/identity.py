"""A model's identity from its files alone: what a prompt's key needs, without torch, transformers or the weights.

A stored prompt's key hashes ``"<model_type>:<weights sha256>"`` (`geomap.ingest.runs.model_identity`). Both parts
are in the model's files: ``config.json`` names the type, and the weights hash is the preset's conversion record
or the sha256 of the safetensors files, exactly as `LoadedModel.weights_hash` computes it. So a rerun can tell
whether everything is stored before it pays for importing torch and loading a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from geomap.digest import sha256_of_files
from geomap.models.presets import PRESETS


@dataclass(frozen=True)
class ModelIdentity:
    """Who a model is, as the store records it.

    Attributes:
        model_type: ``config.model_type`` (the registry's key).
        weights_hash: sha256 over the safetensors files (a preset's conversion record holds it).
    """

    model_type: str
    weights_hash: str

    @property
    def key(self) -> str:
        """The model part of a prompt key (`geomap.ingest.runs.model_identity` of the loaded model)."""
        return f"{self.model_type}:{self.weights_hash}"


def identity_of(name: str) -> ModelIdentity | None:
    """The identity of a preset or a local model directory, read from its files; None when only loading can tell.

    None for a hub id, a preset not converted yet, or a directory without ``config.json`` or safetensors (loading
    it then converts it, or gives the error).
    """
    if name in PRESETS:
        preset = PRESETS[name]
        folder, weights = preset.cache_dir, preset.manifest().get("weights_sha256")
    else:
        folder, weights = Path(name).expanduser(), None
    config = folder / "config.json"
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not config.is_file() or not files:
        return None
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if not isinstance(model_type, str):
        return None
    return ModelIdentity(model_type, weights or sha256_of_files(files))

"""Model stage: presets, offline loading, and the architecture registry."""

from geomap.models.loading import LoadedModel, default_device, load_model, resolve_model_path
from geomap.models.presets import DEFAULT_MODEL, PRESETS, Preset, cache_home, convert
from geomap.models.registry import REGISTRY, Anatomy, ArchSpec, spec_for, supported_architectures

__all__ = [
    "DEFAULT_MODEL",
    "PRESETS",
    "REGISTRY",
    "Anatomy",
    "ArchSpec",
    "LoadedModel",
    "Preset",
    "cache_home",
    "convert",
    "default_device",
    "load_model",
    "resolve_model_path",
    "spec_for",
    "supported_architectures",
]

"""Model stage: presets, offline loading, the architecture registry, and a model's identity from its files.

The names below are loaded on first use (PEP 562), so importing ``geomap.models.presets`` or ``.identity`` (as a
rerun with nothing new does) does not import torch.
"""

from __future__ import annotations

from geomap.lazy import exports

_WHERE = {
    "LoadedModel": "loading", "default_device": "loading", "load_model": "loading", "resolve_model_path": "loading",
    "DEFAULT_MODEL": "presets", "PRESETS": "presets", "Preset": "presets", "cache_home": "presets",
    "convert": "presets", "REGISTRY": "registry", "Anatomy": "registry", "ArchSpec": "registry",
    "spec_for": "registry", "supported_architectures": "registry",
}

__all__ = sorted(_WHERE)

__getattr__ = exports(__name__, _WHERE)

"""Capture stage: one forward pass → `Journey` records of numpy arrays (see `journey` for shapes).

The names below are loaded on first use (PEP 562), so importing ``geomap.capture.config`` or ``.journey`` (as the
store-only commands do) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "CaptureConfig": "config", "capture": "engine", "capture_batch": "engine", "iter_capture": "engine",
    "AttentionInside": "journey", "Journey": "journey", "LensReadout": "journey", "MlpFeatures": "journey",
    "PromptFailure": "journey", "Readout": "journey", "Stream": "journey", "Tokens": "journey", "Unembed": "lens",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """The exported name, imported from its module on first use."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'geomap.capture' has no attribute {name!r}")
    return getattr(importlib.import_module(f"geomap.capture.{module}"), name)

"""Capture stage: one forward pass → `Journey` records of numpy arrays (see `journey` for shapes).

The names below are loaded on first use (PEP 562), so importing ``geomap.capture.config`` or ``.journey`` (as the
store-only commands do) does not import torch.
"""

from __future__ import annotations

from geomap.lazy import exports

_WHERE = {
    "CaptureConfig": "config", "capture": "engine", "capture_batch": "engine", "iter_capture": "engine",
    "AttentionInside": "journey", "Journey": "journey", "LensReadout": "journey", "MlpFeatures": "journey",
    "PromptFailure": "journey", "Readout": "journey", "Stream": "journey", "Tokens": "journey", "Unembed": "lens",
}

__all__ = sorted(_WHERE)

__getattr__ = exports(__name__, _WHERE)

"""Capture stage: one forward pass → `Journey` records of numpy arrays (see `journey` for shapes)."""

from geomap.capture.config import CaptureConfig
from geomap.capture.engine import capture, capture_batch, iter_capture
from geomap.capture.journey import (
    AttentionInside,
    Journey,
    LensReadout,
    MlpFeatures,
    PromptFailure,
    Readout,
    Stream,
    Tokens,
)
from geomap.capture.lens import Unembed

__all__ = [
    "AttentionInside",
    "CaptureConfig",
    "Journey",
    "LensReadout",
    "MlpFeatures",
    "PromptFailure",
    "Readout",
    "Stream",
    "Tokens",
    "Unembed",
    "capture",
    "capture_batch",
    "iter_capture",
]

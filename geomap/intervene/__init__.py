"""Interventions on the wrapped model: patch, ablate, steer and causal trace, batched through hooks.

The names below are loaded on first use (PEP 562), so validating a pipeline's ``[[interventions]]``
(`geomap.intervene.sites`, `.spec`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Baseline": "engine", "Outcome": "engine", "baselines": "engine", "prepare": "engine", "run_specs": "engine",
    "Edit": "hooks", "Edits": "hooks", "InterventionError": "sites", "Site": "sites", "Noise": "spec", "Spec": "spec",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """The exported name, imported from its module on first use."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'geomap.intervene' has no attribute {name!r}")
    return getattr(importlib.import_module(f"geomap.intervene.{module}"), name)

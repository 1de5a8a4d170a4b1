"""Interventions on the wrapped model: patch, ablate, steer and causal trace, batched through hooks.

The names below are loaded on first use (PEP 562), so validating a pipeline's ``[[interventions]]``
(`geomap.intervene.sites`, `.spec`) does not import torch.
"""

from __future__ import annotations

from geomap.lazy import exports

_WHERE = {
    "Baseline": "engine", "Outcome": "engine", "baselines": "engine", "prepare": "engine", "run_specs": "engine",
    "Edit": "hooks", "Edits": "hooks", "InterventionError": "sites", "Site": "sites", "Noise": "spec", "Spec": "spec",
}

__all__ = sorted(_WHERE)

__getattr__ = exports(__name__, _WHERE)

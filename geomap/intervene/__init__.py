"""Interventions on the wrapped model: patch, ablate, steer and causal trace, batched through hooks."""

from geomap.intervene.engine import Baseline, Outcome, baselines, prepare, run_specs
from geomap.intervene.hooks import Edit, Edits, InterventionError, Site
from geomap.intervene.spec import Noise, Spec

__all__ = ["Baseline", "Edit", "Edits", "InterventionError", "Noise", "Outcome", "Site", "Spec", "baselines",
           "prepare", "run_specs"]

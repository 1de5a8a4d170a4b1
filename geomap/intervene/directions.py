"""Vectors an intervention adds or sets: unembedding differences and the mean of a site over prompts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from geomap.intervene.engine import baselines
from geomap.intervene.sites import InterventionError, Site
from geomap.models.loading import LoadedModel


def token_id(loaded: LoadedModel, text: str) -> int:
    """The id of a one-token string (raise `InterventionError` when it is several tokens)."""
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InterventionError(f"{text!r} is {len(ids)} tokens for this model; a direction's token is one token")
    return int(ids[0])


def unembed_direction(loaded: LoadedModel, plus: str, minus: str) -> np.ndarray:
    """u(plus) − u(minus): the difference of two rows of the model's unembedding (d,)."""
    weight = loaded.anatomy.unembed.weight.detach().float()
    return (weight[token_id(loaded, plus)] - weight[token_id(loaded, minus)]).numpy()


def site_mean(loaded: LoadedModel, texts: Sequence[str], site: Site, last_only: bool = False) -> np.ndarray:
    """The mean of a site's value over every position (or the last) of some prompts' runs (width,)."""
    if not texts:
        raise InterventionError("a mean ablation needs at least one prompt in its set")
    runs = baselines(loaded, list(texts), (site,))
    rows = [run.values[site][-1:] if last_only else run.values[site] for run in runs.values()]
    return torch.cat(rows).mean(0).numpy()

"""Checks made before anything is stored: prompts to store, and capture options against the loaded model.

The shapes of options are checked by `geomap.ingest.schema` before the model loads; what depends on the model
(its layer count) or on the prompts' token counts is checked here, after loading but before a run row exists, so
a bad option stores nothing and leaves no run ``running``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from geomap.capture.config import CaptureConfig, resolve_layers, resolve_positions
from geomap.capture.tokens import encode, overflow_message
from geomap.errors import GeomapError, PromptError

if TYPE_CHECKING:
    from geomap.models.loading import LoadedModel


def require_prompts(prompts: Sequence, where: str) -> None:
    """Refuse an input that holds no prompt at all (empty files, blank lines only).

    Raises:
        GeomapError: ``no prompts to store: ...`` naming ``where``.
    """
    if not prompts:
        raise GeomapError(f"no prompts to store: {where} holds no prompt (empty, or blank lines only)")


def check_against_model(loaded: LoadedModel, config: CaptureConfig, texts: Sequence[str]) -> None:
    """Check layers against the model and explicit positions against every prompt's token count.

    Raises:
        GeomapError: A layer outside 0..L, or a position outside some prompt (naming the prompt and its length).
    """
    n_layers = loaded.anatomy.n_layers
    try:
        resolve_layers(config.layers, n_layers)
    except ValueError:
        raise GeomapError(f"layers {list(config.layers)} are not all in this model's range 0..{n_layers} "
                          f"({loaded.name} has {n_layers} layers; negative layers count from the end)") from None
    over_budget(loaded, config, texts)
    explicit = [(name, value) for name, value in (("attn_positions", config.attn_positions),
                                                  ("lens_positions", config.lens_positions))
                if isinstance(value, tuple) and value]
    if not explicit:
        return
    for number, text in enumerate(texts, start=1):
        try:
            length = len(encode(loaded.tokenizer, text, loaded.anatomy.context_window, config.overflow,
                                config.max_tokens).ids)
        except PromptError:
            continue  # stored as a failed prompt with its own reason
        for name, value in explicit:
            try:
                resolve_positions(value, length)
            except ValueError:
                raise GeomapError(f"{name} {list(value)} fall outside prompt {number} ({text[:40]!r}, {length} "
                                  f"tokens: positions 0..{length - 1} or -{length}..-1); use positions every "
                                  "prompt has, or 'last' / 'all'") from None


def over_budget(loaded: LoadedModel, config: CaptureConfig, texts: Sequence[str]) -> None:
    """Refuse the whole batch, before anything is stored, when a prompt exceeds the token budget it was given.

    A budget (``max_tokens``) is the user's own limit, so a prompt over it under ``overflow="error"`` is a mistake
    in the request, not a prompt to record as failed. Without a budget, or with ``overflow="truncate"``, nothing
    is refused here.

    Raises:
        GeomapError: One line naming the first prompt over the budget, its length and the budget.
    """
    budget = config.max_tokens
    if budget is None or config.overflow != "error" or budget >= loaded.anatomy.context_window:
        return
    for number, text in enumerate(texts, start=1):
        if not isinstance(text, str) or not text.strip():
            continue
        length = len(loaded.tokenizer(text, add_special_tokens=True)["input_ids"])
        if length > budget:
            raise GeomapError(overflow_message(text, length, loaded.anatomy.context_window, budget, number))

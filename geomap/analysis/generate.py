"""Autoregressive generation with a decision record per step, and the capture of every step's journey.

Each step runs the wrapped model on the whole sequence so far (no KV cache: the same forward a capture runs),
decides the next token from the full-vocabulary logits with a `Strategy` (so every decision is exact), and
appends it. Step ``i`` of a sampling strategy draws with seed ``seed + i``. Generation stops after
``max_new_tokens`` or at an end-of-sequence token. Because the model is causal, the journey of step ``i`` (the
last token of the sequence so far) is the final sequence's journey at position ``n_prompt - 1 + i``:
`capture_generation` captures the final sequence once, with attention and lens at every decision position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from geomap.analysis.decoding import Candidates, Decision, Strategy, decide
from geomap.capture.config import CaptureConfig
from geomap.capture.engine import capture_batch
from geomap.capture.journey import Journey
from geomap.capture.tokens import Encoded, encode
from geomap.errors import PromptError
from geomap.models.loading import LoadedModel


@dataclass(frozen=True)
class Generation:
    """The outcome of `generate_tokens`.

    Attributes:
        text: The prompt.
        prompt_ids: (n0,) the prompt's token ids (BOS first when the tokenizer adds one).
        new_ids: (n,) the generated ids.
        decisions: One per generated token; decision ``i`` decided position ``n0 - 1 + i``.
        stopped: ``"max_new_tokens"`` or ``"eos"``.
        step_logits: (V,) float32 full-vocabulary logits each decision was made from (what exact decoding of a
            step needs later; stored beside the decisions).
    """

    text: str
    prompt_ids: np.ndarray
    new_ids: np.ndarray
    decisions: tuple[Decision, ...]
    stopped: str
    step_logits: tuple[np.ndarray, ...] = ()

    @property
    def ids(self) -> np.ndarray:
        """(n0 + n,) the whole sequence."""
        return np.concatenate([self.prompt_ids, self.new_ids])


def eos_ids(loaded: LoadedModel) -> set[int]:
    """The model's end-of-sequence ids (generation config, else tokenizer)."""
    value = getattr(loaded.model.generation_config, "eos_token_id", None)
    if value is None:
        value = loaded.tokenizer.eos_token_id
    return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None}


@torch.no_grad()
def generate_tokens(loaded: LoadedModel, text: str, max_new_tokens: int, strategy: Strategy) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after ``text``, deciding each with ``strategy``.

    Raises:
        PromptError: The prompt is empty, or the generation would exceed the context window.
    """
    if max_new_tokens < 1:
        raise PromptError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    window = loaded.anatomy.context_window
    prompt = encode(loaded.tokenizer, text, window)
    if len(prompt.ids) + max_new_tokens > window:
        raise PromptError(f"The prompt's {len(prompt.ids)} tokens plus {max_new_tokens} new ones exceed the "
                          f"context window of {window}.")
    stop = eos_ids(loaded)
    seq = torch.as_tensor(prompt.ids, dtype=torch.long)[None].to(loaded.device)
    decisions, new, stopped, kept = [], [], "max_new_tokens", []
    for step in range(max_new_tokens):
        logits = loaded.model(input_ids=seq, logits_to_keep=1, use_cache=False).logits[0, -1]
        step_strategy = strategy if strategy.greedy else dataclasses.replace(strategy, seed=(strategy.seed or 0) + step)
        full = logits.float().cpu().numpy()
        kept.append(full)
        d = decide(Candidates.from_full(full), step_strategy)
        decisions.append(d)
        new.append(d.chosen_id)
        seq = torch.cat([seq, torch.tensor([[d.chosen_id]], device=seq.device)], dim=1)
        if d.chosen_id in stop:
            stopped = "eos"
            break
    return Generation(text, prompt.ids, np.asarray(new, dtype=np.int64), tuple(decisions), stopped, tuple(kept))


def generation_config(base: CaptureConfig, generation: Generation) -> CaptureConfig:
    """``base`` with attention and lens at every decision position (the last token of each step)."""
    n0 = len(generation.prompt_ids)
    steps = tuple(range(n0 - 1, n0 + len(generation.new_ids)))
    return dataclasses.replace(base, attn_positions=steps, lens_positions=steps)


def capture_generation(loaded: LoadedModel, generation: Generation, config: CaptureConfig) -> Journey:
    """The journey of the whole generated sequence (its exact ids, not a re-tokenised text)."""
    text = generation.text + loaded.tokenizer.decode(generation.new_ids.tolist())
    (journey,) = capture_batch(loaded, [Encoded(text, generation.ids)], config)
    return journey

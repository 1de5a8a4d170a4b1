"""Tokenization for capture: prompt checks, the overflow policy, and each token's raw bytes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from geomap.capture.journey import Tokens
from geomap.errors import PromptError

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class Encoded:
    """A prompt's token ids, ready for a batch.

    Attributes:
        text: The prompt.
        ids: (T,) int64 ids, BOS first when the tokenizer adds one.
        truncated: Whether the overflow policy cut it.
    """

    text: str
    ids: np.ndarray
    truncated: bool = False


def encode(tokenizer, text: str, context_window: int, overflow: str = "error",
           max_tokens: int | None = None) -> Encoded:
    """Tokenize one prompt, refusing empty ones and applying the overflow policy.

    The limit is the context window, or the token budget ``max_tokens`` when it is smaller. Over it,
    ``overflow="truncate"`` keeps the last tokens (BOS stays at position 0); ``"error"`` refuses.

    Raises:
        PromptError: The prompt is empty or whitespace, or over the limit under ``overflow="error"``.
    """
    if not isinstance(text, str) or not text.strip():
        raise PromptError(f"Prompt is empty or whitespace only: {text!r}")
    ids = np.asarray(tokenizer(text, add_special_tokens=True)["input_ids"], dtype=np.int64)
    limit = context_window if max_tokens is None else min(max_tokens, context_window)
    if len(ids) <= limit:
        return Encoded(text, ids)
    if overflow == "error":
        raise PromptError(overflow_message(text, len(ids), context_window, max_tokens))
    bos = tokenizer.bos_token_id
    keep_bos = bos is not None and ids[0] == bos
    tail = ids[-(limit - int(keep_bos)):]
    return Encoded(text, np.concatenate([ids[:1], tail]) if keep_bos else tail, truncated=True)


def overflow_message(text: str, length: int, context_window: int, max_tokens: int | None, number: int | None = None
                     ) -> str:
    """One line refusing a prompt over the limit: the prompt, its length, the limit, and what each way out costs."""
    name = f"Prompt {text[:40]!r}" if number is None else f"Prompt {number} ({text[:40]!r})"
    if max_tokens is not None and max_tokens < context_window:
        return (f"{name} has {length} tokens, over the budget of --max-tokens {max_tokens}; "
                f"shorten it, raise --max-tokens, or add --overflow truncate to keep its last {max_tokens} tokens")
    cost = ", a capture that takes minutes of CPU per prompt with no progress shown inside it" \
        if context_window >= 4096 else ""
    return (f"{name} has {length} tokens, more than the model's context window of {context_window}; shorten it, or "
            f"give a budget with --max-tokens N --overflow truncate (max_tokens in a pipeline's [capture]), which "
            f"keeps the last N tokens; --overflow truncate alone keeps the last {context_window}{cost}")


@lru_cache(maxsize=8)
def _byte_level(tokenizer) -> dict[str, int] | None:
    """The char→byte table of a byte-level BPE tokenizer (GPT-2 style), or None for other tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
    if "ByteLevel" not in kinds:
        return None
    # GPT-2's reversible byte→unicode map: printable bytes map to themselves, the rest to 256+n.
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer, piece: str) -> bytes:
    """Raw bytes of one (non-special) vocabulary piece."""
    table = _byte_level(tokenizer)
    if table is not None and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    match = _BYTE_TOKEN.match(piece)
    if match:  # SentencePiece byte fallback
        return bytes([int(match.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def describe_tokens(tokenizer, ids: np.ndarray) -> Tokens:
    """Token strings, raw bytes and special flags for a sequence of ids."""
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    special_ids = set(tokenizer.all_special_ids)
    raw, texts, special = [], [], []
    for token_id, piece in zip(ids, pieces):
        is_special = int(token_id) in special_ids
        data = piece.encode("utf-8") if is_special else token_bytes(tokenizer, piece)
        raw.append(data)
        texts.append(data.decode("utf-8", errors="replace"))
        special.append(is_special)
    return Tokens(np.asarray(ids, dtype=np.int64), tuple(texts), tuple(raw), np.array(special, dtype=bool))

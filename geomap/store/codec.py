"""Compact vector storage: bfloat16 as the top 16 bits of float32 (round to nearest even).

float16 cannot hold Gemma-3's residuals (components beyond 65,504 become inf); bfloat16 keeps float32's
exponent range with an 8-bit mantissa (relative error ≤ 2^-9 per component). Layout of a ``vec_bf16`` BLOB:
d little-endian uint16 values, component i at bytes 2i..2i+1.
"""

from __future__ import annotations

import numpy as np

LOGIT_CHUNK = 4096  # token ids per ``final_logits`` row: small rows, so a checkpoint never pins megabyte values


def encode_bf16(x: np.ndarray) -> np.ndarray:
    """float32 (..., d) → uint16 (..., d) bfloat16 bit patterns, rounded to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def decode_bf16(bits: np.ndarray) -> np.ndarray:
    """uint16 (..., d) bfloat16 bit patterns → float32 (..., d)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_blob(x: np.ndarray) -> bytes:
    """One float32 vector → its ``vec_bf16`` BLOB."""
    return encode_bf16(x).astype("<u2").tobytes()


def from_blob(blob: bytes) -> np.ndarray:
    """A ``vec_bf16`` BLOB → float32 vector."""
    return decode_bf16(np.frombuffer(blob, dtype="<u2"))

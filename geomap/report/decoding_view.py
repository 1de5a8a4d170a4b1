"""What the page's decoding controls compute from: the listed top logits, exactly, and a summary of the rest.

The unlisted logits (all but the top `LISTED`) are grouped into narrow bins (`BIN` wide); each bin keeps its count
and mean logit. At temperature T a bin's mass is count · exp(mean / T), which differs from the exact sum over its
tokens by a relative error of at most about BIN² / (8 T²) (0.5% of the tail at T = 0.1, where the unlisted tokens
carry almost no mass, 2e-6 at T = 5). Top-k and top-p treat a bin's tokens as equal, as transformers would up to
that width. `tests/report/test_journey_controls.py` checks the page against transformers' processors for T in [0.1, 5].
"""

from __future__ import annotations

import numpy as np

LISTED = 300  # top logits embedded one by one (with their tokens)
BIN = 0.02  # width of a bin of unlisted logits


def tail_summary(logits_sorted: np.ndarray, listed: int = LISTED, ids_sorted: np.ndarray | None = None) -> dict:
    """Bins of the logits after the first ``listed`` of a descending array: ``{"lo", "bin", "i", "n", "m", "r"}``.

    ``i`` are bin indices (descending logit order), ``n`` counts and ``m`` the mean logits, rounded to 1e-5. ``r``
    (with ``ids_sorted``) names one member of each bin, drawn uniformly with a fixed seed: the page treats a bin's
    tokens as equally likely, so a draw that lands in a bin is that member (each member is as likely to be named).
    """
    tail = np.asarray(logits_sorted[listed:], np.float64)
    if not len(tail):
        return {"lo": 0.0, "bin": BIN, "i": [], "n": [], "m": [], "r": []}
    top = float(tail[0])
    idx = np.floor((top - tail) / BIN).astype(np.int64)
    uniq, start, counts = np.unique(idx, return_index=True, return_counts=True)
    sums = np.add.reduceat(tail, start)
    members = []
    if ids_sorted is not None:
        pick = start + (np.random.default_rng(0).random(len(counts)) * counts).astype(np.int64)
        members = [int(t) for t in np.asarray(ids_sorted[listed:])[pick]]
    return {"lo": round(top, 6), "bin": BIN, "i": uniq.tolist(), "n": counts.tolist(),
            "m": [round(float(s / c), 5) for s, c in zip(sums, counts)], "r": members}


def decoding_payload(ids: np.ndarray, logits: np.ndarray, texts: dict[int, str], logsumexp: float,
                     vocab_size: int, complete: bool) -> dict:
    """The decoding controls' data: the listed tokens (exact logits) and the unlisted tail's bins.

    When the stored logits are not complete (a position other than the last keeps only its top-k), the tail is
    one block of unknown shape: its mass at T = 1 is known from the log normaliser; the page says so.
    """
    order = np.argsort(-np.asarray(logits, np.float64), kind="stable")
    ids, logits = np.asarray(ids)[order], np.asarray(logits, np.float64)[order]
    top = [{"id": int(t), "token": texts.get(int(t)), "logit": float(np.float32(z)),
            "prob": float(np.exp(z - logsumexp))} for t, z in zip(ids[:LISTED], logits[:LISTED])]
    return {"top": top, "logsumexp": float(logsumexp), "vocab_size": int(vocab_size), "complete": bool(complete),
            "tail": tail_summary(logits, ids_sorted=ids) if complete else None,
            "unlisted": int(vocab_size) - len(top)}

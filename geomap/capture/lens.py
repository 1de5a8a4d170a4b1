"""The model's own final norm + unembedding, applied in large batched chunks (the logit lens).

Readouts rank candidates on raw logits (fp32 softmax leaves exact ties) and use log-softmax only for
probabilities, entropy and KL. Work is chunked so that one chunk's logits stay near 64 MB.
"""

from __future__ import annotations

import numpy as np
import torch

from geomap.capture.journey import Readout
from geomap.models.registry import Anatomy

_CHUNK_BYTES = 1 << 26


class Unembed:
    """The model's final norm and unembedding, as the map from a residual vector to next-token logits.

    Args:
        anatomy: The model's registry view; its own modules are used, so the lens at the last layer is
            exactly the model's logits.
    """

    def __init__(self, anatomy: Anatomy):
        self.anatomy = anatomy
        self.norm = anatomy.final_norm
        self.head = anatomy.unembed
        self.softcap = anatomy.final_logit_softcap
        self.chunk = max(1, _CHUNK_BYTES // (4 * anatomy.vocab_size))

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, d) residuals → (N, V) float32 logits."""
        x = self.head(self.norm(h.to(self.head.weight.dtype)))
        if self.softcap is not None:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x.float()

    @torch.no_grad()
    def readout(self, h: torch.Tensor, top_k: int, reference: torch.Tensor | None = None,
                reference_ids: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """Top-k, entropy and logsumexp of the distributions that ``h`` (N, d) maps to.

        Args:
            h: Residual vectors.
            top_k: Candidates to keep.
            reference: Optional (N, d) residuals whose distributions are the KL reference (the final
                layer at the same positions): adds ``kl`` = KL(h's ‖ reference's).
            reference_ids: Optional (N,) token ids whose rank (1-based, on raw logits) and probability
                under h's distribution are returned as ``rank`` and ``prob``.

        Returns:
            Arrays ``ids, logits, probs`` (N, k), ``entropy, logsumexp`` (N,), and ``kl``, ``rank``,
            ``prob`` (N,) when asked for.
        """
        parts: dict[str, list] = {}
        for start in range(0, h.shape[0], self.chunk):
            stop = start + self.chunk
            z = self.logits(h[start:stop])
            lse = torch.logsumexp(z, dim=-1)
            logp = z - lse[:, None]
            p = logp.exp()
            top = z.topk(min(top_k, z.shape[-1]), dim=-1)
            got = {
                "ids": top.indices, "logits": top.values, "probs": p.gather(-1, top.indices),
                "entropy": -(p * logp).sum(-1), "logsumexp": lse,
            }
            if reference is not None:
                ref = self.logits(reference[start:stop])
                ref_logp = ref - torch.logsumexp(ref, dim=-1, keepdim=True)  # same arithmetic as logp
                got["kl"] = (p * (logp - ref_logp)).sum(-1).clamp_min(0.0)
            if reference_ids is not None:
                ids = reference_ids[start:stop, None]
                got["rank"] = 1 + (z > z.gather(-1, ids)).sum(-1)
                got["prob"] = p.gather(-1, ids)[:, 0]
            for key, value in got.items():
                parts.setdefault(key, []).append(value.cpu())
        return {key: torch.cat(value).numpy() for key, value in parts.items()}


def to_readout(arrays: dict[str, np.ndarray], lead: tuple[int, ...]) -> Readout:
    """Wrap `Unembed.readout` arrays as a `Readout` with leading shape ``lead``."""
    k = arrays["ids"].shape[-1]
    return Readout(
        ids=arrays["ids"].astype(np.int64).reshape(*lead, k),
        logits=arrays["logits"].astype(np.float32).reshape(*lead, k),
        probs=arrays["probs"].astype(np.float32).reshape(*lead, k),
        entropy=arrays["entropy"].astype(np.float32).reshape(lead),
        logsumexp=arrays["logsumexp"].astype(np.float32).reshape(lead),
    )

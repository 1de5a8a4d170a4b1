"""The model's own final norm + unembedding, applied in large batched chunks (the logit lens).

Readouts rank candidates on raw logits (fp32 softmax leaves exact ties). Probabilities come from one
softmax pass per row; entropy and KL use the identities

    H(p)        = lse(z) − Σ p·z
    KL(p ‖ q)   = Σ p·(z − r) + lse(r) − lse(z)        (p = softmax z, q = softmax r)

so that each chunk costs one GEMM and a handful of passes over preallocated buffers (no per-op
allocation of vocabulary-sized temporaries). A lens row's KL reference is the final layer at the same
position, computed once per position in the same GEMM as the lens rows. Chunks hold about 64 MB of
logits.
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
        self._buffers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, d) residuals → (N, V) float32 logits."""
        x = self.head(self.norm(h.to(self.head.weight.dtype)))
        if self.softcap is not None:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x.float()

    @torch.no_grad()
    def readout(self, h: torch.Tensor, top_k: int) -> dict[str, np.ndarray]:
        """Top-k, entropy and logsumexp of the distributions that ``h`` (N, d) maps to.

        Returns:
            Arrays ``ids, logits, probs`` (N, k) and ``entropy, logsumexp`` (N,).
        """
        parts: dict[str, list] = {}
        for start in range(0, h.shape[0], self.chunk):
            z = self._logits_chunk(h[start:start + self.chunk])
            _append(parts, self._stats(z, top_k))
        return _concat(parts, h.shape[0], top_k)

    @torch.no_grad()
    def lens(self, lens_h: torch.Tensor, final_h: torch.Tensor,
             top_k: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The logit lens at P positions × B residual boundaries, against each position's final layer.

        Args:
            lens_h: (P, B) residuals, position-major.
            final_h: (P, d) final-layer residuals at the same positions.
            top_k: Candidates to keep.

        Returns:
            ``(final, lens)``: ``final`` holds `readout`'s arrays for ``final_h`` (leading shape (P,));
            ``lens`` holds them with leading shape (P, B), plus ``kl`` = KL(lens ‖ final) in nats, and
            ``rank`` (1-based, on raw logits) and ``prob`` of the final top-1 token under the lens.
        """
        n_pos, n_bound, d = lens_h.shape
        per = max(1, self.chunk // (n_bound + 1))
        fin_parts: dict[str, list] = {}
        lens_parts: dict[str, list] = {}
        for start in range(0, n_pos, per):
            hf = final_h[start:start + per]
            n = hf.shape[0]
            z = self._logits_chunk(torch.cat([hf, lens_h[start:start + per].reshape(-1, d)]))
            ref = self._stats(z[:n], top_k)
            owner = torch.arange(n, device=z.device).repeat_interleave(n_bound)
            _append(fin_parts, ref)
            _append(lens_parts, self._stats(z[n:], top_k, ref_z=z[:n], ref_lse=ref["logsumexp"],
                                            ref_ids=ref["ids"][:, 0], owner=owner))
        final = _concat(fin_parts, n_pos, top_k)
        flat = _concat(lens_parts, n_pos * n_bound, top_k)
        if not lens_parts:
            flat.update(kl=np.zeros(0, np.float32), rank=np.zeros(0, np.int64), prob=np.zeros(0, np.float32))
        return final, {key: value.reshape(n_pos, n_bound, *value.shape[1:]) for key, value in flat.items()}

    def _logits_chunk(self, h: torch.Tensor) -> torch.Tensor:
        """`logits` into a reused buffer when the head is a plain float32 matrix (no softcap)."""
        weight = self.head.weight
        if weight.dtype != torch.float32 or self.softcap is not None:
            return self.logits(h)
        x = self.norm(h.to(weight.dtype))
        out = self._buffer("z", torch.empty((0, weight.shape[0]), device=x.device), rows=x.shape[0])
        torch.mm(x, weight.t(), out=out)
        if getattr(self.head, "bias", None) is not None:
            out.add_(self.head.bias)
        return out

    def _buffer(self, name: str, like: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """A reusable float32 work buffer shaped like ``like`` (or with ``rows`` rows)."""
        rows = like.shape[0] if rows is None else rows
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1:] != like.shape[1:] or buf.device != like.device:
            buf = self._buffers[name] = torch.empty((rows, *like.shape[1:]), device=like.device)
        return buf[:rows]

    def _stats(self, z: torch.Tensor, top_k: int, ref_z: torch.Tensor | None = None,
               ref_lse: torch.Tensor | None = None, ref_ids: torch.Tensor | None = None,
               owner: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Softmax statistics of logits ``z`` (N, V); with a reference, KL and the reference top-1's rank."""
        p, work = self._buffer("p", z), self._buffer("work", z)
        peak = z.amax(-1, keepdim=True)
        torch.sub(z, peak, out=p).exp_()
        total = p.sum(-1, keepdim=True)
        p.div_(total)
        lse = (peak + total.log())[:, 0]
        top = z.topk(min(top_k, z.shape[-1]), dim=-1)
        p_dot_z = torch.mul(p, z, out=work).sum(-1)
        got = {"ids": top.indices, "logits": top.values, "probs": p.gather(-1, top.indices),
               "entropy": (lse - p_dot_z).clamp_min(0.0), "logsumexp": lse}
        if ref_z is not None:
            torch.index_select(ref_z, 0, owner, out=work)
            p_dot_r = work.mul_(p).sum(-1)
            got["kl"] = (p_dot_z - p_dot_r + ref_lse[owner] - lse).clamp_min(0.0)
            ids = ref_ids[owner, None]
            threshold = z.gather(-1, ids)
            torch.sub(z, threshold, out=work).clamp_(min=0.0).sign_()  # 1 where strictly above, else 0
            got["rank"] = 1 + work.sum(-1).round().long()
            got["prob"] = p.gather(-1, ids)[:, 0]
        return got


def _append(parts: dict[str, list], got: dict[str, torch.Tensor]) -> None:
    for key, value in got.items():
        parts.setdefault(key, []).append(value.cpu())


def _concat(parts: dict[str, list], n: int, top_k: int) -> dict[str, np.ndarray]:
    if not parts:  # no rows at all
        return {"ids": np.zeros((n, top_k), np.int64), "logits": np.zeros((n, top_k), np.float32),
                "probs": np.zeros((n, top_k), np.float32), "entropy": np.zeros(n, np.float32),
                "logsumexp": np.zeros(n, np.float32)}
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

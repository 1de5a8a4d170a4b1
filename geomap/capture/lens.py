"""The model's own final norm + unembedding, applied block by block over the vocabulary (the logit lens).

Readouts rank candidates on raw logits (fp32 softmax leaves exact ties). Each row chunk is streamed over the
vocabulary in blocks small enough to stay in cache; every block is one GEMM, then an online (rescaled) update of

    lse(z) = m + log Σ e^(z−m),   Σ e^(z−m)·(z−m),   Σ e^(z−m)·(z−r),   #{z > z_ref-top1},   top-k

so that no row ever holds its whole vocabulary of logits in memory. Entropy and KL follow from the identities

    H(p)        = lse(z) − Σ p·z = log Σ e^(z−m) − Σ p·(z−m)
    KL(p ‖ q)   = Σ p·(z − r) + lse(r) − lse(z)        (p = softmax z, q = softmax r)

written with centred logits and differences (no cancellation between large sums), accumulated in float64. A lens
row's KL reference is the final layer at the same position, computed in the same GEMM as the lens rows. A block's
statistics run as one loop fused by ``torch.compile`` when the work is large (`_Kernels`), else eagerly.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from geomap.capture.journey import Readout
from geomap.capture.topk import RunningTopK
from geomap.models.registry import Anatomy

_BLOCK_FLOATS = 1 << 20  # rows × vocabulary block held per GEMM (4 MB of float32: cache-sized on a CPU)
_ROWS = 512  # rows per chunk (each chunk streams the unembedding matrix once)
_FLOOR = -80.0  # centred logits below this weigh < 2e-35 next to the maximum's 1: clamped, not lost
_COMPILE_FROM = 1 << 24  # rows × vocabulary from which the block statistics run as one compiled, fused loop

log = logging.getLogger(__name__)


def _centred_exp(z: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The new running maximum m' of rows ``z`` (n, b) over ``m`` (n,), z − m' (clamped) and e = e^(z − m')."""
    new_m = torch.maximum(m, z.amax(-1))
    centred = (z - new_m[:, None]).clamp_min(_FLOOR)  # e^-80 stays a normal float: denormals slow exp ~40x
    return new_m, centred, centred.exp()


def _block_stats(z: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One vocabulary block ``z`` (n, b) against the running maximum ``m`` (n,).

    Returns:
        The new maximum m' and, over the block, Σ e and Σ e·(z − m') with e = e^(z − m') (float32).
    """
    new_m, centred, e = _centred_exp(z, m)
    return new_m, e.sum(-1), (e * centred).sum(-1)


def _block_stats_ref(z: torch.Tensor, m: torch.Tensor, refs: torch.Tensor, owner: torch.Tensor,
                     threshold: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`_block_stats`, plus Σ e·(z − r) against each row's reference row ``refs[owner]`` and #{z > threshold}."""
    new_m, centred, e = _centred_exp(z, m)
    gap = z - refs.index_select(0, owner)  # z − r, small where the lens agrees with the final layer
    return new_m, e.sum(-1), (e * centred).sum(-1), (e * gap).sum(-1), (z > threshold[:, None]).sum(-1)


class _Kernels:
    """The block statistics, compiled once per process by torch.compile (one fused loop instead of six passes).

    Eager torch runs them when the work is small, when ``GEOMAP_COMPILE=0``, or when compiling fails (no C++
    compiler, say): the results agree to float32 rounding.
    """

    def __init__(self):
        self.compiled: dict[str, object] = {}
        self.failed = os.environ.get("GEOMAP_COMPILE", "1") == "0"

    def get(self, name: str, size: int):
        eager = _block_stats if name == "plain" else _block_stats_ref
        if self.failed or size < _COMPILE_FROM:
            return eager
        if name not in self.compiled:
            self.compiled[name] = torch.compile(eager, dynamic=True)
        compiled = self.compiled[name]

        def run(*args):
            if self.failed:
                return eager(*args)
            try:
                return compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to the same maths, eagerly
                self.failed = True
                log.warning("torch.compile of the lens statistics failed (%s); using eager torch", exc)
                return eager(*args)

        return run


_KERNELS = _Kernels()


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
        self._work: torch.Tensor | None = None  # the reused float32 buffer of a block's logits

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
        for start in range(0, h.shape[0], _ROWS):
            _append(parts, self._scan(self._normed(h[start:start + _ROWS]), top_k))
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
        final = self.readout(final_h, top_k)
        per = max(1, _ROWS // max(n_bound, 1))
        lens_parts: dict[str, list] = {}
        top1 = torch.as_tensor(final["ids"][:, 0], device=final_h.device)
        ref_lse = torch.as_tensor(final["logsumexp"], device=final_h.device)
        for start in range(0, n_pos, per):
            stop = min(n_pos, start + per)
            n = stop - start
            owner = torch.arange(n, device=lens_h.device).repeat_interleave(n_bound)
            x = self._normed(lens_h[start:stop].reshape(-1, d))
            ids = top1[start:stop][owner]
            got = self._scan(x, top_k, ref_x=self._normed(final_h[start:stop]), owner=owner, ref_ids=ids)
            got["kl"] = (got.pop("p_gap") + (ref_lse[start:stop][owner].double()
                                             - got["logsumexp"].double()).float()).clamp_min(0.0)
            _append(lens_parts, got)
        flat = _concat(lens_parts, n_pos * n_bound, top_k)
        if not lens_parts:
            flat.update(kl=np.zeros(0, np.float32), rank=np.zeros(0, np.int64), prob=np.zeros(0, np.float32))
        return final, {key: value.reshape(n_pos, n_bound, *value.shape[1:]) for key, value in flat.items()}

    @property
    def vocab_size(self) -> int:
        """Rows of the unembedding."""
        return self.head.weight.shape[0]

    @torch.no_grad()
    def normed(self, h: torch.Tensor) -> torch.Tensor:
        """Residuals ``h`` (N, d) through the final norm, in the unembedding's dtype (what `block` takes)."""
        return self._normed(h)

    @torch.no_grad()
    def block(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Float32 logits of normed rows ``x`` for vocabulary rows ``start:stop``.

        The result lives in a work buffer that the next call reuses (clone it to keep it).
        """
        return self._block(x, start, stop)

    def _normed(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h.to(self.head.weight.dtype))

    def _block(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Logits of normed rows ``x`` for vocabulary rows ``start:stop``, float32 (in a reused buffer)."""
        weight = self.head.weight[start:stop]
        out = self._buffer(x.shape[0], stop - start, x.device) if weight.dtype == torch.float32 else None
        return self._finish(_gemm(x, weight, out), slice(start, stop))

    def _finish(self, raw: torch.Tensor, columns) -> torch.Tensor:
        """Add the head's bias for vocabulary ``columns`` and apply the softcap, in place on float32 ``raw``."""
        bias = getattr(self.head, "bias", None)
        if bias is not None:
            raw.add_(bias[columns].float())
        if self.softcap is not None:
            raw.div_(self.softcap).tanh_().mul_(self.softcap)
        return raw

    def _buffer(self, rows: int, cols: int, device) -> torch.Tensor:
        """The reused float32 work buffer, viewed as ``rows × cols`` (grown when too small)."""
        if self._work is None or self._work.numel() < rows * cols or self._work.device != device:
            self._work = torch.empty(rows * cols, device=device)
        return self._work[: rows * cols].view(rows, cols)

    def _scan(self, x: torch.Tensor, top_k: int, ref_x: torch.Tensor | None = None,
              owner: torch.Tensor | None = None, ref_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One pass over the vocabulary for normed rows ``x`` (n, d): logsumexp, Σp·z, top-k by online updates.

        With a reference (``ref_x`` rows, ``owner[i]`` the reference of row i, ``ref_ids[i]`` its top-1 token),
        also Σp·(z−r) for the KL (``p_gap``), and the rank and probability of the reference's top-1 under row i.
        """
        n, vocab = x.shape[0], self.head.weight.shape[0]
        k = min(top_k, vocab)
        step = max(k, _BLOCK_FLOATS // max(n, 1))
        f64 = {"device": x.device, "dtype": torch.float64}
        m = torch.full((n,), -torch.inf, device=x.device)
        s, q, diff = torch.zeros(n, **f64), torch.zeros(n, **f64), torch.zeros(n, **f64)
        top_v, top_i = torch.full((n, 0), -torch.inf, device=x.device), torch.zeros((n, 0), dtype=torch.long,
                                                                                     device=x.device)
        if ref_x is not None:
            # The reference token's logit by the same GEMM kernel as the blocks (a row-wise dot rounds differently
            # and would shift near-tied ranks): one column per distinct reference token.
            distinct, which = torch.unique(ref_ids, return_inverse=True)
            own_logits = _gemm(x, self.head.weight[distinct])
            threshold = self._finish(own_logits[torch.arange(n, device=x.device), which].contiguous(), ref_ids)
            above = torch.zeros(n, dtype=torch.long, device=x.device)
            chosen = torch.zeros(n, device=x.device)
        heap = RunningTopK(n, k) if x.device.type == "cpu" else None
        both = x if ref_x is None else torch.cat([ref_x, x])  # one GEMM per block for the lens rows and references
        n_ref = 0 if ref_x is None else ref_x.shape[0]
        stats = _KERNELS.get("plain" if ref_x is None else "ref", n * vocab)
        for start in range(0, vocab, step):
            stop = min(vocab, start + step)
            zz = self._block(both, start, stop)
            z = zz[n_ref:]
            if ref_x is None:
                new_m, s_block, q_block = stats(z, m)
            else:
                new_m, s_block, q_block, d_block, a_block = stats(z, m, zz[:n_ref], owner, threshold)
            shift = torch.where(torch.isfinite(m), m - new_m, 0.0).double()  # ≤ 0; 0 before the first block
            rescale = shift.exp()
            # Σ e·(z − m) moves with m: Σ e'·(z − m') = rescale · (Σ e·(z − m) + (m − m')·Σ e)
            q = rescale * (q + shift * s) + q_block.double()
            s = s * rescale + s_block.double()
            if ref_x is not None:
                diff = diff * rescale + d_block.double()
                above += a_block
                inside = (ref_ids >= start) & (ref_ids < stop)
                if inside.any():  # the reference token's own logit, from this same GEMM
                    rows = inside.nonzero()[:, 0]
                    own = z[rows, ref_ids[rows] - start]
                    chosen[rows] = own
                    above[rows] -= (own > threshold[rows]).long()  # the token itself is never above itself
            m = new_m
            if heap is not None:
                heap.update(z.numpy(), start)
            else:
                bv, bi = z.topk(min(k, stop - start), dim=-1)
                top_v, order = torch.cat([top_v, bv], -1).topk(min(k, top_v.shape[1] + bv.shape[1]), dim=-1)
                top_i = torch.gather(torch.cat([top_i, bi + start], -1), -1, order)
        if heap is not None:
            values, ids = heap.result()
            top_v, top_i = torch.from_numpy(values), torch.from_numpy(ids)
        log_s = s.log()
        lse = (m.double() + log_s).float()
        got = {"ids": top_i, "logits": top_v, "probs": torch.exp(top_v - lse[:, None]),
               "entropy": (log_s - q / s).float().clamp_min(0.0), "logsumexp": lse}
        if ref_x is not None:
            got.update(p_gap=(diff / s).float(), rank=1 + above, prob=torch.exp(chosen - lse))
        return got


def _gemm(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T`` as float32; a float32 weight goes through ``torch.mm`` (into ``out`` when given)."""
    if weight.dtype == torch.float32:
        return torch.mm(x, weight.t(), out=out)
    return torch.nn.functional.linear(x, weight).float()


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

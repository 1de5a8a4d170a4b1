"""A tuned lens (Belrose et al. 2023, arXiv 2303.08112): one affine translator per layer, trained on stored states.

The logit lens reads boundary ℓ as ``unembed(norm(h))``; the tuned lens reads ``unembed(norm(h + A_ℓ h + b_ℓ))``,
with ``A_ℓ`` (d × d) and ``b_ℓ`` (d) trained to minimise KL(final ‖ lens) over stored positions. The translators
start at zero, so training starts from the logit lens.

What is approximated, and how it is checked:
    Training computes the KL over a vocabulary subset (the union of every training position's final top
    candidates, at most ``vocab_limit`` tokens; both distributions renormalised on it), since a 262k-token
    softmax per step is too slow on a CPU. With little data a d × d translator overfits, so training keeps the
    step with the lowest KL on a validation split of the training prompts (weight decay too). The reported
    figures are **exact**: full-vocabulary KL on held-out prompts, for the tuned lens and for the logit lens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from geomap.models.loading import LoadedModel


@dataclass(frozen=True)
class TunedLens:
    """Trained translators.

    Attributes:
        layers: (k,) boundaries with a translator (0..L-1).
        weights: (k, d, d) A_ℓ, applied as ``h + h @ A_ℓ + b_ℓ`` (row vectors).
        biases: (k, d) b_ℓ.
    """

    layers: np.ndarray
    weights: np.ndarray
    biases: np.ndarray


@dataclass(frozen=True)
class LayerReport:
    """Held-out figures of one layer: mean full-vocabulary KL(lens ‖ final), nats, of both lenses.

    ``steps`` is the training step kept (0 = the logit lens itself).
    """

    layer: int
    tuned_kl: float
    logit_kl: float
    steps: int


def final_logprobs(loaded: LoadedModel, h: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Log-probabilities of the model's own final readout of residuals ``h``, computed ``chunk`` rows at a time."""
    a = loaded.anatomy
    out = []
    for start in range(0, len(h), chunk):
        z = a.unembed(a.final_norm(h[start:start + chunk])).float()
        if a.final_logit_softcap is not None:
            z = torch.tanh(z / a.final_logit_softcap) * a.final_logit_softcap
        out.append(torch.log_softmax(z, -1))
    return torch.cat(out)


def full_kl(loaded: LoadedModel, h: torch.Tensor, final_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact KL(lens(h) ‖ final) (n,) over the whole vocabulary, and the lens's top-1 ids (n,).

    The direction is that of ``lens_stats.kl_to_final``, so the two lenses compare in SQL.
    """
    logq = final_logprobs(loaded, h)
    return (logq.exp() * (logq - final_logp)).sum(-1).clamp_min(0.0), logq.argmax(-1)


@torch.no_grad()
def _subset(final_logp: torch.Tensor, per_position: int, limit: int) -> torch.Tensor:
    ids = final_logp.topk(per_position, -1).indices.reshape(-1)
    unique, counts = torch.unique(ids, return_counts=True)
    return unique[counts.argsort(descending=True)[:limit]].sort().values


def train_tuned_lens(loaded: LoadedModel, resid: np.ndarray, train: np.ndarray, heldout: np.ndarray,
                     steps: int = 150, lr: float = 1e-3, weight_decay: float = 1e-2, vocab_limit: int = 4096,
                     seed: int = 0) -> tuple[TunedLens, list[LayerReport]]:
    """Train one translator per layer on stored residuals.

    Args:
        loaded: The model (its final norm and unembedding are the lens).
        resid: (L+1, N, d) residuals of N stored positions.
        train: (N,) bool, positions to train on (a tenth of them, by prompt, validates).
        heldout: (N,) bool, positions to report on (never trained or validated on).
        steps: Full-batch Adam steps per layer.
        lr: Adam learning rate.
        weight_decay: Adam weight decay on the translator.
        vocab_limit: Size cap of the training vocabulary subset.
        seed: Seed of the train/validation split.

    Returns:
        The translators, and one held-out report per layer.
    """
    torch.manual_seed(seed)
    a = loaded.anatomy
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    h_all = torch.as_tensor(resid, dtype=torch.float32)
    n_layers, d = h_all.shape[0] - 1, h_all.shape[2]
    with torch.no_grad():
        final_logp = final_logprobs(loaded, h_all[-1])
    train_idx = np.flatnonzero(train)
    rng = np.random.default_rng(seed)
    val_mask = rng.random(len(train_idx)) < 0.1
    fit_idx, val_idx = train_idx[~val_mask], train_idx[val_mask] if val_mask.any() else train_idx[:1]
    vocab = _subset(final_logp[fit_idx], 64, vocab_limit)
    u = a.unembed.weight[vocab].detach().float()
    teacher = torch.log_softmax(final_logp[:, vocab], -1)
    held = torch.as_tensor(np.flatnonzero(heldout))

    def subset_kl(h: torch.Tensor, idx) -> torch.Tensor:
        z = a.final_norm(h) @ u.T
        if a.final_logit_softcap is not None:
            z = torch.tanh(z / a.final_logit_softcap) * a.final_logit_softcap
        t = teacher[idx]
        return (t.exp() * (t - torch.log_softmax(z, -1))).sum(-1).mean()

    weights, biases, reports = [], [], []
    for layer in range(n_layers):
        h = h_all[layer]
        weight = torch.zeros(d, d, requires_grad=True)
        bias = torch.zeros(d, requires_grad=True)
        opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
        best = (float("inf"), weight.detach().clone(), bias.detach().clone(), 0)
        scale = h[fit_idx].norm(dim=-1).mean().clamp_min(1e-6)  # the bias is learnt in units of a typical |h|
        for step in range(steps + 1):
            with torch.no_grad():
                val = float(subset_kl(_translate(h[val_idx], weight, bias, scale), val_idx))
            if val < best[0]:
                best = (val, weight.detach().clone(), bias.detach().clone(), step)
            if step == steps:
                break
            opt.zero_grad()
            subset_kl(_translate(h[fit_idx], weight, bias, scale), fit_idx).backward()
            opt.step()
        _, w, b, at = best
        w_eff, b_eff = w.numpy(), (b * scale).numpy()
        weights.append(w_eff)
        biases.append(b_eff)
        with torch.no_grad():
            tuned = h[held] + h[held] @ torch.as_tensor(w_eff) + torch.as_tensor(b_eff)
            reports.append(LayerReport(layer, float(full_kl(loaded, tuned, final_logp[held])[0].mean()),
                                       float(full_kl(loaded, h[held], final_logp[held])[0].mean()), at))
    lens = TunedLens(np.arange(n_layers), np.stack(weights).astype(np.float32), np.stack(biases).astype(np.float32))
    return lens, reports


def _translate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x + x @ weight + bias * scale


def apply_tuned_lens(lens: TunedLens, layer: int, h: np.ndarray) -> np.ndarray:
    """Translate residuals (n, d) at ``layer`` as the tuned lens reads them."""
    i = int(np.flatnonzero(lens.layers == layer)[0])
    return h + h @ lens.weights[i] + lens.biases[i]

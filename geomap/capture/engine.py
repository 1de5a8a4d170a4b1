"""One forward pass over a batch of prompts → one `Journey` per prompt.

Prompts are right-padded (so position ids need no adjustment), sorted by length into batches to cut
padding, and read back per prompt without the padding. Per-prompt failures (empty, too long) become
`PromptFailure` records while the rest of the batch proceeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from geomap.capture.config import CaptureConfig, resolve_layers, resolve_positions
from geomap.capture.journey import AttentionInside, Journey, LensReadout, MlpFeatures, PromptFailure, Stream
from geomap.capture.lens import Unembed, to_readout
from geomap.capture.recorder import Recorder, Recording
from geomap.capture.states import capture_states_batch
from geomap.capture.tokens import Encoded, describe_tokens, encode
from geomap.errors import PromptError
from geomap.models.loading import LoadedModel


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _pad_index(rows: list[np.ndarray], device) -> torch.Tensor:
    """(B, Q) index: each row's positions, padded by repeating its last one."""
    width = max(len(r) for r in rows)
    return torch.tensor(np.stack([np.pad(r, (0, width - len(r)), mode="edge") for r in rows]), device=device)


def _head_shares(loaded: LoadedModel, rec: Recording, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's part of the attention update at the query rows, and the W_O bias's part."""
    a = loaded.anatomy
    w_o, bias = a.w_o(layer)  # (d, H*Dh)
    head_out = rec.head_out[layer].float()  # (B, Q, H, Dh)
    weight = w_o.float().view(a.d_model, a.n_heads, a.head_dim)
    share = torch.einsum("bqhe,dhe->bqhd", head_out, weight)
    bias_share = (bias.float() if bias is not None else torch.zeros(a.d_model, device=share.device)).expand(
        *share.shape[:2], a.d_model)
    post = a.post_attn_norm(layer)
    if post is not None:  # freeze the post-attention norm at the scale it applied to the whole output
        scale = a.norm_scale(post, rec.o_rows[layer])[..., None]
        share = a.norm_frozen(post, share, scale)
        bias_share = a.norm_frozen(post, bias_share, scale[..., 0])
    return share, bias_share


def _readouts(unembed: Unembed, resid: torch.Tensor, boundaries: np.ndarray, lens_pos: list[np.ndarray],
              lengths: list[int], top_k: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Final readout at every real position (prompt-major), and the lens at the lens positions.

    Returns:
        ``(final, lens)``: ``final`` arrays lead with the sum of ``lengths``; ``lens`` arrays lead with
        (sum of lens positions, boundaries), prompt-major then position.
    """
    device = resid.device
    rows_b = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(lens_pos)]).to(device)
    rows_p = torch.cat([torch.as_tensor(p, dtype=torch.long) for p in lens_pos]).to(device)
    bounds = torch.as_tensor(np.asarray(boundaries), dtype=torch.long, device=device)
    lens_h = resid[bounds][:, rows_b, rows_p].transpose(0, 1)  # (P, B, d)
    fin_lens, lens = unembed.lens(lens_h, resid[-1][rows_b, rows_p], top_k)
    offsets = np.cumsum([0, *lengths])
    covered = np.zeros(offsets[-1], dtype=bool)
    lens_index = np.concatenate([offsets[b] + np.asarray(p, dtype=np.int64) for b, p in enumerate(lens_pos)])
    covered[lens_index] = True
    rest = np.flatnonzero(~covered)
    rest_b = np.searchsorted(offsets, rest, side="right") - 1
    fin_rest = unembed.readout(resid[-1][torch.as_tensor(rest_b), torch.as_tensor(rest - offsets[rest_b])],
                               top_k)
    final = {}
    for key, value in fin_lens.items():
        merged = np.empty((offsets[-1], *value.shape[1:]), dtype=value.dtype)
        merged[lens_index], merged[rest] = value, fin_rest[key]
        final[key] = merged
    return final, lens


def _or_empty(x: np.ndarray, tail: tuple[int, ...]) -> np.ndarray:
    return x if x.ndim > 1 else np.zeros((0, *tail), np.float32)


def _heads_last(x: np.ndarray, tail: tuple[int, ...]) -> np.ndarray:
    """(La, heads, rows, Dh) → (La, rows, heads, Dh); empty when no layer is captured."""
    return x.transpose(0, 2, 1, 3) if x.ndim > 1 else np.zeros((0, *tail), np.float32)


@torch.no_grad()
def pad_batch(batch: Sequence[Encoded], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (B, max length) for encoded prompts."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, : len(e.ids)] = torch.from_numpy(e.ids)
        mask[row, : len(e.ids)] = 1
    return ids, mask


def _norm_scales(rec: Recording, n_layers: int, k_norms: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """The norms' scales as numpy: (L, k, B, T) per layer norm, and (B, T) of the final norm."""
    scales = _np(torch.stack([rec.norm_scale[(i, k)] for i in range(n_layers) for k in range(k_norms)]))
    return scales.reshape(n_layers, k_norms, *shape), _np(rec.final_scale)


def _per_layer(rec: Recording, layers: list[int], shares: dict) -> dict[str, list[np.ndarray]]:
    """Each per-layer capture as numpy, one array per captured layer, by name (heads' and bias shares included)."""
    inside = {name: [_np(getattr(rec, name)[layer]) for layer in layers]
              for name in ("q", "k", "v", "scores", "weights", "head_out", "mlp_value")}
    inside["mlp_index"] = [rec.mlp_index[layer].cpu().numpy() for layer in layers]
    inside["head_share"] = [_np(shares[layer][0]) for layer in layers]
    inside["bias_share"] = [_np(shares[layer][1]) for layer in layers]
    return inside


def capture_batch(loaded: LoadedModel, batch: Sequence[Encoded], config: CaptureConfig) -> list[Journey]:
    """Capture a batch of already-encoded prompts in one forward pass."""
    a, model, device = loaded.anatomy, loaded.model, loaded.device
    lengths = [len(e.ids) for e in batch]
    n_layers = a.n_layers
    ids, mask = pad_batch(batch, loaded.tokenizer.pad_token_id or 0)
    attn_pos = [resolve_positions(config.attn_positions, n) for n in lengths]
    lens_pos = [resolve_positions(config.lens_positions, n) for n in lengths]
    boundaries = resolve_layers(config.layers, n_layers)
    layers = [int(x) for x in boundaries if x < n_layers]
    last = sorted({n - 1 for n in lengths})
    with Recorder(a, _pad_index(attn_pos, device), layers, config.mlp_top, config.attn_base) as recorder:
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    logits_to_keep=torch.tensor(last, device=device), use_cache=False)
    rec = recorder.recording
    resid = torch.stack(rec.resid)  # (L+1, B, T, d)
    unembed = Unembed(a)
    final, lens = _readouts(unembed, resid, boundaries, lens_pos, lengths, config.top_k)
    shares = {layer: _head_shares(loaded, rec, layer) for layer in layers}

    # One transfer per tensor, then per-prompt numpy slices.
    r, at, ml = _np(resid), _np(torch.stack(rec.attn_add)), _np(torch.stack(rec.mlp_add))
    scales, final_scale = _norm_scales(rec, n_layers, len(a.spec.layer_norms), mask.shape)
    inside = _per_layer(rec, layers, shares)
    last_logits = _np(out.logits)
    flat_final = np.cumsum([0, *lengths])
    flat_lens = np.cumsum([0, *[len(p) for p in lens_pos]])

    def per_prompt(name: str, b: int, *index) -> np.ndarray:
        """Stack one prompt's slice of a per-layer capture; (0, ...) when no layer is captured."""
        arrays = inside[name]
        return np.stack([x[(b, *index)] for x in arrays]) if arrays else np.zeros((0,), np.float32)

    journeys = []
    for b, e in enumerate(batch):
        n, nq, npos = lengths[b], len(attn_pos[b]), len(lens_pos[b])
        all_, q_rows, keys = slice(None), slice(0, nq), slice(0, n)
        attention = AttentionInside(
            layers=np.asarray(layers, dtype=np.int64).reshape(-1),
            positions=attn_pos[b],
            scaling=np.asarray([rec.scaling[layer] for layer in layers], dtype=np.float32),
            q=_heads_last(per_prompt("q", b, all_, q_rows), (nq, a.n_heads, a.head_dim)),
            k=_heads_last(per_prompt("k", b, all_, keys), (n, a.n_kv_heads, a.head_dim)),
            v=_heads_last(per_prompt("v", b, all_, keys), (n, a.n_kv_heads, a.head_dim)),
            scores=_or_empty(per_prompt("scores", b, all_, q_rows, keys), (a.n_heads, nq, n)),
            weights=_or_empty(per_prompt("weights", b, all_, q_rows, keys), (a.n_heads, nq, n)),
            head_out=_or_empty(per_prompt("head_out", b, q_rows), (nq, a.n_heads, a.head_dim)),
            head_share=_or_empty(per_prompt("head_share", b, q_rows), (nq, a.n_heads, a.d_model)),
            bias_share=_or_empty(per_prompt("bias_share", b, q_rows), (nq, a.d_model)),
        )
        mlp = MlpFeatures(
            index=_or_empty(per_prompt("mlp_index", b, q_rows), (nq, config.mlp_top)).astype(np.int64),
            value=_or_empty(per_prompt("mlp_value", b, q_rows), (nq, config.mlp_top)),
        )
        fsl = slice(flat_final[b], flat_final[b + 1])
        lsl = slice(flat_lens[b], flat_lens[b + 1])
        lead = (len(boundaries), npos)
        lens_b = {key: np.swapaxes(value[lsl], 0, 1) for key, value in lens.items()}  # (B, P, ...)
        journeys.append(Journey(
            text=e.text,
            model=loaded.name,
            tokens=describe_tokens(loaded.tokenizer, e.ids),
            stream=Stream(resid=r[:, b, :n], attn=at[:, b, :n], mlp=ml[:, b, :n],
                          norm_scale=scales[:, :, b, :n], norm_names=a.spec.layer_norms,
                          final_norm_scale=final_scale[b, :n]),
            attention=attention,
            mlp=mlp,
            final=to_readout({k: v[fsl] for k, v in final.items()}, (n,)),
            last_logits=last_logits[b, last.index(n - 1)],
            lens=LensReadout(
                layers=boundaries, positions=lens_pos[b],
                top=to_readout(lens_b, lead),
                kl_to_final=lens_b["kl"].reshape(lead).astype(np.float32),
                final_rank=lens_b["rank"].reshape(lead).astype(np.int64),
                final_prob=lens_b["prob"].reshape(lead).astype(np.float32),
            ),
            truncated=e.truncated,
        ))
    return journeys


def iter_capture(loaded: LoadedModel, texts: Iterable[str], config: CaptureConfig | None = None,
                 batch_size: int = 8) -> Iterator[tuple[int, Journey | PromptFailure]]:
    """Capture prompts batch by batch, yielding ``(index, Journey or PromptFailure)`` as each batch ends.

    Batches are formed from consecutive prompts, sorted by length inside the batch window.
    """
    config = config or CaptureConfig()
    window: list[tuple[int, Encoded]] = []

    def flush():
        window.sort(key=lambda item: len(item[1].ids))
        capture_one = capture_states_batch if config.profile == "states" else capture_batch
        journeys = capture_one(loaded, [e for _, e in window], config)
        done = [(i, j) for (i, _), j in zip(window, journeys)]
        window.clear()
        return done

    for index, text in enumerate(texts):
        try:
            window.append((index, encode(loaded.tokenizer, text, loaded.anatomy.context_window, config.overflow,
                                         config.max_tokens)))
        except PromptError as exc:
            yield index, PromptFailure(index, text if isinstance(text, str) else repr(text), str(exc))
            continue
        if len(window) == batch_size:
            yield from flush()
    if window:
        yield from flush()


def capture(loaded: LoadedModel, texts: Sequence[str] | str, config: CaptureConfig | None = None,
            batch_size: int = 8) -> list[Journey | PromptFailure]:
    """Capture prompts; returns one `Journey` (or `PromptFailure`) per prompt, in input order."""
    if isinstance(texts, str):
        texts = [texts]
    results = dict(iter_capture(loaded, texts, config, batch_size))
    return [results[i] for i in range(len(texts))]

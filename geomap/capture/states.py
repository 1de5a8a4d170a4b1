"""The ``"states"`` capture profile: the residual stream and the final readout, from one plain forward pass.

No attention function is swapped and no per-module hook runs but one: transformers' own ``output_hidden_states``
gives the input of every decoder layer (boundaries 0..L-1), and a pre-hook on the final norm gives boundary L (the
last block's output, before the final norm, as the full capture stores it). The final readout (top-k, entropy,
logsumexp at every position) goes through the same `Unembed` as the full capture, and the last position's logits
are the model's own output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from geomap.capture.config import CaptureConfig
from geomap.capture.host import to_host
from geomap.capture.journey import AttentionInside, Journey, LensReadout, MlpFeatures, Stream
from geomap.capture.lens import Unembed, to_readout
from geomap.capture.tokens import Encoded, describe_tokens
from geomap.models.loading import LoadedModel


@torch.no_grad()
def capture_states_batch(loaded: LoadedModel, batch: Sequence[Encoded], config: CaptureConfig) -> list[Journey]:
    """Capture a batch of encoded prompts keeping only the residual stream and the final readout."""
    from geomap.capture.engine import pad_batch

    a, model, device = loaded.anatomy, loaded.model, loaded.device
    lengths = [len(e.ids) for e in batch]
    ids, mask = pad_batch(batch, loaded.tokenizer.pad_token_id or 0)
    last = sorted({n - 1 for n in lengths})
    grabbed: dict[str, torch.Tensor] = {}
    handle = a.final_norm.register_forward_pre_hook(lambda _m, args: grabbed.__setitem__("final", args[0]))
    try:
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                    logits_to_keep=torch.tensor(last, device=device), use_cache=False)
    finally:
        handle.remove()
    resid = torch.stack([*out.hidden_states[: a.n_layers], grabbed["final"]])  # (L+1, B, T, d)
    rows_b = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(lengths)]).to(device)
    rows_p = torch.cat([torch.arange(n) for n in lengths]).to(device)
    final_h = resid[-1][rows_b, rows_p]
    final = Unembed(a).readout(final_h, config.top_k)
    final_scale, r, last_logits = to_host(a.norm_scale(a.final_norm, final_h), resid, out.logits)  # one sync
    final_scale = final_scale.reshape(-1)
    offsets = np.cumsum([0, *lengths])
    k_norms, d = len(a.spec.layer_norms), a.d_model
    journeys = []
    for b, e in enumerate(batch):
        n, rows = lengths[b], slice(offsets[b], offsets[b + 1])
        journeys.append(Journey(
            text=e.text, model=loaded.name, tokens=describe_tokens(loaded.tokenizer, e.ids),
            stream=Stream(resid=r[:, b, :n], attn=np.zeros((0, n, d), np.float32),
                          mlp=np.zeros((0, n, d), np.float32), norm_scale=np.zeros((0, k_norms, n), np.float32),
                          norm_names=a.spec.layer_norms, final_norm_scale=final_scale[rows]),
            attention=_no_attention(a, n), mlp=MlpFeatures(index=np.zeros((0, 0, 0), np.int64),
                                                          value=np.zeros((0, 0, 0), np.float32)),
            final=to_readout({k: v[rows] for k, v in final.items()}, (n,)),
            last_logits=last_logits[b, last.index(n - 1)], lens=_no_lens(), truncated=e.truncated,
            profile="states"))
    return journeys


def _no_attention(a, n: int) -> AttentionInside:
    empty = np.zeros((0,), np.int64)
    return AttentionInside(
        layers=empty, positions=empty, scaling=np.zeros((0,), np.float32),
        q=np.zeros((0, 0, a.n_heads, a.head_dim), np.float32), k=np.zeros((0, n, a.n_kv_heads, a.head_dim)),
        v=np.zeros((0, n, a.n_kv_heads, a.head_dim)), scores=np.zeros((0, a.n_heads, 0, n), np.float32),
        weights=np.zeros((0, a.n_heads, 0, n), np.float32), head_out=np.zeros((0, 0, a.n_heads, a.head_dim)),
        head_share=np.zeros((0, 0, a.n_heads, a.d_model), np.float32),
        bias_share=np.zeros((0, 0, a.d_model), np.float32))


def _no_lens() -> LensReadout:
    empty = np.zeros((0,), np.int64)
    top = to_readout({"ids": np.zeros((0, 1)), "logits": np.zeros((0, 1)), "probs": np.zeros((0, 1)),
                      "entropy": np.zeros((0,)), "logsumexp": np.zeros((0,))}, (0, 0))
    return LensReadout(layers=empty, positions=empty, top=top, kl_to_final=np.zeros((0, 0), np.float32),
                       final_rank=np.zeros((0, 0), np.int64), final_prob=np.zeros((0, 0), np.float32))

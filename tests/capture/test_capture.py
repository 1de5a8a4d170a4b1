"""Capture invariants, on tiny random models of every supported architecture and on the real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geomap.capture import CaptureConfig, Journey, capture
from tests.tiny import ARCHS

PROMPTS = [
    "The storm is coming over the hills",
    "Paris",
    "def add(a, b):\n    return a + b",
    "Naïve café 東京 🌩️ and the rain is moving east",
]
ALL = CaptureConfig(attn_positions="all", lens_positions="all")


@pytest.fixture(params=[*ARCHS, pytest.param("real", marks=pytest.mark.real)], scope="module")
def subject(request, tiny_models):
    return request.getfixturevalue("real") if request.param == "real" else tiny_models[request.param]


@pytest.fixture(scope="module")
def journeys(subject) -> list[Journey]:
    return capture(subject, PROMPTS, ALL, batch_size=len(PROMPTS))


def rel_err(a, b) -> float:
    """Largest per-vector error relative to the reference vector's norm (last axis)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-12)).max())


def reference(subject, journey, **kwargs):
    ids = torch.tensor(journey.tokens.ids)[None]
    with torch.no_grad():
        return subject.model(input_ids=ids, use_cache=False, **kwargs)


def test_bos_is_position_zero_and_bytes_round_trip(subject, journeys):
    for text, j in zip(PROMPTS, journeys):
        assert j.tokens.ids[0] == subject.tokenizer.bos_token_id and j.tokens.special[0]
        body = b"".join(raw for raw, special in zip(j.tokens.raw, j.tokens.special) if not special)
        assert body == text.encode("utf-8")
        for raw, shown in zip(j.tokens.raw, j.tokens.texts):
            assert shown == raw.decode("utf-8", errors="replace")


def test_residuals_equal_output_hidden_states_same_pass(subject):
    """Inside one forward pass the recorder's residuals are transformers' hidden states, bit for bit."""
    from geomap.capture.recorder import Recorder

    a = subject.anatomy
    ids = torch.tensor(subject.tokenizer(PROMPTS[0])["input_ids"])[None]
    with torch.no_grad(), Recorder(a, torch.tensor([[ids.shape[1] - 1]]), [], 4) as rec:
        hidden = subject.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for layer in range(a.n_layers):
        assert torch.equal(rec.resid[layer], hidden[layer])
    with torch.no_grad():  # transformers' last hidden state is after the final norm; ours is before it
        assert torch.equal(a.final_norm(rec.resid[-1]), hidden[-1])


def test_residuals_equal_output_hidden_states(subject, journeys):
    a = subject.anatomy
    for j in journeys:
        hidden = reference(subject, j, output_hidden_states=True).hidden_states
        resid = j.stream.resid
        assert rel_err(resid[: a.n_layers], torch.stack(hidden[: a.n_layers])[:, 0]) <= 1e-5
        with torch.no_grad():
            normed = a.final_norm(torch.from_numpy(resid[-1]))
        assert rel_err(normed, hidden[-1][0]) <= 1e-5


def test_lens_at_last_layer_equals_model_logits(subject, journeys):
    tol = 1e-4
    for j in journeys:
        logits = reference(subject, j).logits[0].float().numpy()  # (T, V)
        last = j.lens.layers.tolist().index(subject.anatomy.n_layers)
        lens_ids, lens_logits = j.lens.top.ids[last], j.lens.top.logits[last]  # (T, k)
        assert rel_err(lens_logits, np.take_along_axis(logits, lens_ids, -1)) <= tol
        assert rel_err(j.final.logits, np.take_along_axis(logits, j.final.ids, -1)) <= tol
        assert (j.final.ids[:, 0] == logits.argmax(-1)).all()
        lse = torch.logsumexp(torch.from_numpy(logits), -1).numpy()
        np.testing.assert_allclose(j.final.logsumexp, lse, rtol=tol)
        np.testing.assert_allclose(j.lens.top.logsumexp[last], lse, rtol=tol)
        assert rel_err(j.last_logits, logits[-1]) <= tol
        assert (j.lens.final_rank[last] == 1).all()
        np.testing.assert_allclose(j.lens.kl_to_final[last], 0, atol=1e-5)
        probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
        np.testing.assert_allclose(j.final.probs, np.take_along_axis(probs, j.final.ids, -1), atol=1e-6, rtol=tol)
        entropy = -(probs * np.log(np.maximum(probs, 1e-30))).sum(-1)
        np.testing.assert_allclose(j.final.entropy, entropy, rtol=1e-3, atol=1e-4)


def test_lens_statistics_at_every_layer_match_a_plain_float64_softmax(subject, journeys):
    """Entropy, KL to final, rank and probability of the final top-1, recomputed naively per layer."""
    a = subject.anatomy
    j = journeys[0]
    with torch.no_grad():
        resid = torch.from_numpy(j.stream.resid)  # (L+1, T, d)
        logits = subject.model.lm_head(a.final_norm(resid)).double()
        if a.final_logit_softcap is not None:
            logits = torch.tanh(logits / a.final_logit_softcap) * a.final_logit_softcap
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1).numpy()
    kl = (logp.exp() * (logp - logp[-1])).sum(-1).numpy()
    top1 = torch.from_numpy(j.final.ids[:, 0])
    chosen = logits.gather(-1, top1.expand(logits.shape[0], -1)[..., None])
    rank = 1 + (logits > chosen).sum(-1).numpy()
    prob = logp.exp().gather(-1, top1.expand(logits.shape[0], -1)[..., None])[..., 0].numpy()
    layers = j.lens.layers
    np.testing.assert_allclose(j.lens.top.entropy, entropy[layers], rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(j.lens.kl_to_final, kl[layers], rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(j.lens.final_prob, prob[layers], rtol=1e-3, atol=1e-6)
    near_tie = np.abs(rank[layers] - j.lens.final_rank) > 0
    assert near_tie.mean() < 0.01, f"ranks differ at {near_tie.sum()} of {near_tie.size} cells"
    np.testing.assert_allclose(j.lens.top.logsumexp, torch.logsumexp(logits, -1).numpy()[layers], rtol=1e-5)


def _mask(subject, layer: int, length: int) -> np.ndarray:
    """The additive mask this layer applies: causal, plus Gemma's sliding window on sliding layers."""
    q, k = np.arange(length)[:, None], np.arange(length)[None, :]
    allowed = k <= q
    types = getattr(subject.model.config, "layer_types", None)
    if types and types[layer] == "sliding_attention":
        allowed &= (q - k) < subject.model.config.sliding_window
    return np.where(allowed, 0.0, -np.inf)


def test_attention_matches_eager_and_recomputes(subject, journeys):
    model = subject.model
    saved = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        refs = [reference(subject, j, output_attentions=True).attentions for j in journeys]
    finally:
        model.set_attn_implementation(saved)
    a = subject.anatomy
    for j, ref in zip(journeys, refs):
        att = j.attention
        length = len(j.tokens)
        assert att.positions.tolist() == list(range(length))
        for i, layer in enumerate(att.layers):
            np.testing.assert_allclose(att.weights[i], ref[layer][0].numpy(), atol=2e-5)
            mask = _mask(subject, layer, length)
            expected = torch.softmax(torch.from_numpy(att.scores[i] + mask), -1).numpy()
            np.testing.assert_allclose(att.weights[i], expected, atol=1e-6)
            keys = np.repeat(att.k[i], a.n_heads // a.n_kv_heads, axis=1)  # (T, H, Dh)
            scores = np.einsum("qhd,khd->hqk", att.q[i], keys) * att.scaling[i]
            np.testing.assert_allclose(att.scores[i], scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
        np.testing.assert_allclose(att.weights.sum(-1), 1.0, atol=1e-5)
        future = np.triu(np.ones((length, length), bool), 1)
        assert (att.weights[:, :, future] == 0).all()


def test_stream_adds_up_and_heads_sum_to_attention(subject, journeys):
    for j in journeys:
        s, att = j.stream, j.attention
        assert rel_err(s.resid[:-1] + s.attn + s.mlp, s.resid[1:]) <= 1e-4
        whole = s.attn[att.layers][:, att.positions]
        assert rel_err(att.head_share.sum(2) + att.bias_share, whole) <= 1e-4


def test_norm_scales_reproduce_the_norms(subject, journeys):
    a = subject.anatomy
    for j in journeys:
        s = j.stream
        resid = torch.from_numpy(s.resid)
        with torch.no_grad():
            final = a.final_norm(resid[-1])
            first = a.layer_norms(0)[0](resid[0])
        bias = lambda norm: 0 if getattr(norm, "bias", None) is None else norm.bias.detach()  # noqa: E731
        frozen = a.norm_frozen(a.final_norm, resid[-1], torch.from_numpy(s.final_norm_scale))
        assert rel_err(frozen + bias(a.final_norm), final) <= 1e-5
        norm0 = a.layer_norms(0)[0]
        frozen0 = a.norm_frozen(norm0, resid[0], torch.from_numpy(s.norm_scale[0, 0]))
        assert rel_err(frozen0 + bias(norm0), first) <= 1e-5


def test_mlp_features_are_the_largest_hidden_activations(subject, journeys):
    a = subject.anatomy
    seen = {}
    handles = [a.mlp_down(i).register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
               for i in range(a.n_layers)]
    try:
        j = journeys[0]
        reference(subject, j)
    finally:
        for h in handles:
            h.remove()
    for i, layer in enumerate(j.attention.layers):
        hidden = seen[layer][0, j.attention.positions].numpy()  # (Q, I)
        top = np.take_along_axis(hidden, j.mlp.index[i], -1)
        np.testing.assert_allclose(j.mlp.value[i], top, rtol=1e-4, atol=1e-5)
        kth = np.abs(j.mlp.value[i]).min(-1, keepdims=True)
        assert (np.sort(np.abs(hidden), -1)[:, -j.mlp.index.shape[-1] - 1: -j.mlp.index.shape[-1]] <= kth + 1e-6).all()


def test_batched_equals_unbatched(subject, journeys):
    singles = capture(subject, PROMPTS, ALL, batch_size=1)
    for one, many in zip(singles, journeys):
        assert (one.tokens.ids == many.tokens.ids).all()
        for name in ("resid", "attn", "mlp"):
            assert rel_err(getattr(many.stream, name), getattr(one.stream, name)) <= 1e-4, name
        assert rel_err(many.attention.head_share, one.attention.head_share) <= 1e-4
        assert rel_err(many.attention.q, one.attention.q) <= 1e-4
        np.testing.assert_allclose(many.attention.weights, one.attention.weights, atol=1e-4)
        np.testing.assert_allclose(many.lens.top.logsumexp, one.lens.top.logsumexp, rtol=1e-4)
        np.testing.assert_allclose(many.lens.kl_to_final, one.lens.kl_to_final, rtol=1e-4, atol=1e-4)
        assert rel_err(many.last_logits, one.last_logits) <= 1e-4


def test_compiled_lens_statistics_equal_eager(subject, journeys, monkeypatch):
    """The fused torch.compile kernels (used for large lens work) give the eager statistics to float32 rounding."""
    from geomap.capture import lens as lens_mod

    j = journeys[0]
    resid = torch.from_numpy(j.stream.resid).transpose(0, 1)  # (T, L+1, d): every position at every boundary
    unembed = lens_mod.Unembed(subject.anatomy)
    monkeypatch.setattr(lens_mod, "_KERNELS", lens_mod._Kernels())
    lens_mod._KERNELS.failed = True
    final_e, eager = unembed.lens(resid, resid[:, -1], 5)
    monkeypatch.setattr(lens_mod, "_COMPILE_FROM", 0)
    lens_mod._KERNELS.failed = False
    final_c, compiled = unembed.lens(resid, resid[:, -1], 5)
    assert not lens_mod._KERNELS.failed and lens_mod._KERNELS.compiled  # the compiled path really ran
    for key in ("ids", "rank"):
        np.testing.assert_array_equal(compiled[key], eager[key])
    for key in ("entropy", "logsumexp", "kl", "prob"):
        np.testing.assert_allclose(compiled[key], eager[key], rtol=1e-4, atol=1e-4, err_msg=key)
    np.testing.assert_allclose(final_c["entropy"], final_e["entropy"], rtol=1e-4, atol=1e-4)

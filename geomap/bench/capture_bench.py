"""Capture and lens figures: geomap's capture beside the bare forward pass and the peers, the lens beside a GEMM."""

from __future__ import annotations

import torch

from geomap.bench.core import Figure, judged, median, median_ratio, rounds
from geomap.capture.config import CaptureConfig
from geomap.capture.engine import capture_batch, pad_batch
from geomap.capture.tokens import encode


def batches(loaded, texts: list[str], size: int = 8) -> list[dict]:
    """Padded batches of ``size`` prompts: ``ids``, ``mask``, the encoded prompts, and the real token count."""
    out = []
    for start in range(0, len(texts) - size + 1, size):
        enc = [encode(loaded.tokenizer, t, loaded.anatomy.context_window) for t in texts[start:start + size]]
        ids, mask = pad_batch(enc, loaded.tokenizer.pad_token_id or 0)
        out.append({"ids": ids, "mask": mask, "encoded": enc, "tokens": int(mask.sum())})
    return out


def _peers(loaded) -> dict:
    """The peers, nnsight and TransformerLens v4, wrapping of the same weights, when installed."""
    found = {}
    try:
        import nnsight

        found["nnsight"] = nnsight.LanguageModel(loaded.model, tokenizer=loaded.tokenizer)
    except Exception:  # noqa: BLE001, S110 - an optional peer; its figure is left out
        pass
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoModelForCausalLM

        copy = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32).eval()  # the bridge rewires it
        found["transformer_lens"] = TransformerBridge.boot_transformers(
            loaded.name, hf_model=copy, tokenizer=loaded.tokenizer, device="cpu", dtype=torch.float32)
    except Exception:  # noqa: BLE001, S110 - an optional peer; its figure is left out
        pass
    return found


def capture_figures(loaded, texts: list[str], repeats: int, peers: bool = True) -> list[Figure]:
    """Tokens/s of geomap's capture and of the references, on the same batches, rounds interleaved."""
    model = loaded.model
    work = batches(loaded, texts)
    tokens = sum(b["tokens"] for b in work)
    config = CaptureConfig(lens_positions=())  # states, contributions, attention, final readout; no lens

    @torch.no_grad()
    def forward(**extra):
        for b in work:
            model(input_ids=b["ids"], attention_mask=b["mask"], use_cache=False, **extra)

    configs = {
        "forward": lambda: forward(),
        "forward_hidden": lambda: forward(output_hidden_states=True),
        "forward_last_logits": lambda: forward(logits_to_keep=1),
        "capture": lambda: [capture_batch(loaded, b["encoded"], config) for b in work],
    }
    found = _peers(loaded) if peers else {}
    if "nnsight" in found:
        lm = found["nnsight"]

        def nn_run():
            for b in work:
                with torch.no_grad(), lm.trace({"input_ids": b["ids"], "attention_mask": b["mask"]}):
                    [layer.output.save() for layer in lm.model.layers]

        configs["nnsight"] = nn_run
    if "transformer_lens" in found:
        bridge = found["transformer_lens"]

        def tl_run():
            for b in work:
                with torch.no_grad():
                    bridge.run_with_cache(b["ids"], attention_mask=b["mask"])

        configs["transformer_lens"] = tl_run
    t = rounds(configs, repeats)
    hidden = t["forward_hidden"]
    gflop = 2 * loaded.model.num_parameters() * tokens / 1e9
    figs = [
        judged("capture throughput", tokens / median(t["capture"]), "tokens/s",
               note=f"{len(work)} batches of 8 prompts, {tokens} tokens, {loaded.name}"),
        judged("capture vs forward with output_hidden_states", median_ratio(hidden, t["capture"]), "x", ">= 0.90",
               note="time ratio per round; capture also keeps attention inside, contributions, norms, MLP neurons "
                    "and the top-50 final readout at every position (no lens)"),
        judged("forward (sdpa) throughput", tokens / median(t["forward"]), "tokens/s",
               note=f"about {gflop / median(t['forward']):.0f} GFLOP/s counting 2 x parameters per token"),
        judged("forward with output_hidden_states vs forward", median_ratio(t["forward"], hidden), "x"),
        judged("forward, logits at the last position only, speed-up", median_ratio(t["forward"],
                                                                                   t["forward_last_logits"]), "x",
               note="logits_to_keep=1"),
    ]
    for peer in ("nnsight", "transformer_lens"):
        if peer in t:
            figs.append(judged(f"{peer} vs forward with output_hidden_states", median_ratio(hidden, t[peer]), "x",
                               note="nnsight saving every layer's output" if peer == "nnsight"
                               else "TransformerBridge.run_with_cache (every hook)"))
    return figs


def lens_figures(loaded, n_states: int, repeats: int) -> list[Figure]:
    """The logit lens (top-k, entropy, KL, rank) over ``n_states`` residuals, as GFLOP/s beside a plain matmul."""
    from geomap.capture.lens import Unembed

    a = loaded.anatomy
    unembed = Unembed(a)
    gen = torch.Generator().manual_seed(0)
    n_bound = a.n_layers + 1
    n_pos = max(1, n_states // n_bound)
    # Residual-like inputs: the embedding rows of random tokens, scaled like mid-stream states.
    ids = torch.randint(0, a.vocab_size, (n_pos * (n_bound + 1),), generator=gen)
    h = a.embed.weight[ids].detach().float() * 30.0
    lens_h, final_h = h[: n_pos * n_bound].reshape(n_pos, n_bound, -1), h[n_pos * n_bound:]
    rows = n_pos * (n_bound + 1)
    w = a.unembed.weight.detach().float()
    x = torch.randn(rows, a.d_model, generator=gen)
    out = torch.empty(rows, w.shape[0])

    def plain():
        return x @ w.t()  # as one writes it: a fresh (rows, V) float32 result every time

    def peak():
        torch.mm(x, w.t(), out=out)  # the same GEMM into a reused, already-touched buffer: the kernel's peak

    t = rounds({"lens": lambda: unembed.lens(lens_h, final_h, 50), "matmul": plain, "gemm_peak": peak}, repeats)
    flop = 2 * rows * a.d_model * w.shape[0] / 1e9
    gib = rows * w.shape[0] * 4 / 2**30
    return [
        judged("lens throughput", flop / median(t["lens"]), "GFLOP/s",
               note=f"{rows} states x {w.shape[0]} vocabulary: top-50, entropy, KL and rank of the final choice"),
        judged("plain matmul of the same shape", flop / median(t["matmul"]), "GFLOP/s",
               note=f"x @ W.T, writing {gib:.1f} GiB of logits"),
        judged("lens vs same-shape plain matmul", median_ratio(t["matmul"], t["lens"]), "x", ">= 1.0"),
        judged("GEMM peak of the same shape", flop / median(t["gemm_peak"]), "GFLOP/s",
               note="torch.mm into a reused buffer: no page faults, the kernel alone"),
        judged("lens vs GEMM peak", median_ratio(t["gemm_peak"], t["lens"]), "x",
               note="the lens does this GEMM plus its passes over the logits, so it stays below 1.0 wherever the GEMM "
                    "is compute-bound"),
    ]

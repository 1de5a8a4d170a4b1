"""Steady-state ingestion: seconds per prompt once the pipeline has filled, with the fixed costs apart.

Two ingestions of the same short prompts, ``small`` and ``large`` of them, into fresh stores; their difference over
``large - small`` prompts is the steady-state cost of one prompt (model load and the first checkpoint of the small
run cancel out). The FAISS indexes are built after each ingestion, timed apart: that build runs once, when a run
ends, so it is reported as the run's fixed cost beside the steady state (in seconds, and per prompt of the large
run), and the whole-run figures include it. The forward pass with ``output_hidden_states`` over the same prompts, in
batches of 8, is differenced the same way. Each profile is measured in each store layout.
"""

from __future__ import annotations

import time
from pathlib import Path

from geomap.bench.core import Figure, judged
from geomap.capture.config import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.store.db import connect, ensure_schema
from geomap.store.segments import segment_dir
from geomap.store.vectors import sync_state_indexes
from geomap.store.writer import PromptSpec


def _ingest_seconds(loaded, texts: list[str], path: Path, profile: str,
                    layout: str) -> tuple[float, float, int, int]:
    """Seconds of one ingestion into a fresh store of ``layout`` and of its FAISS build; its tokens, bytes on disk."""
    from geomap.bench.store_bench import fresh_path

    path = fresh_path(path.parent, path.name)
    con = connect(path)
    ensure_schema(con, loaded.anatomy.d_model, layout=layout)
    con.close()
    start = time.perf_counter()
    summary = ingest(loaded, [PromptSpec(t) for t in texts], path, CaptureConfig(profile=profile), progress=False,
                     index=False)
    seconds = time.perf_counter() - start
    con = connect(path)
    try:
        start = time.perf_counter()
        sync_state_indexes(con, path)  # what `ingest` does when its run ends
        indexing = time.perf_counter() - start
        con.execute("CHECKPOINT")
    finally:
        con.close()
    size = path.stat().st_size + sum(p.stat().st_size for p in segment_dir(path).glob("*"))
    return seconds, indexing, summary.tokens, size


def _forward_seconds(loaded, texts: list[str]) -> float:
    import torch

    from geomap.bench.capture_bench import batches

    work = batches(loaded, texts)
    start = time.perf_counter()
    with torch.no_grad():
        for b in work:
            loaded.model(input_ids=b["ids"], attention_mask=b["mask"], use_cache=False, output_hidden_states=True)
    return time.perf_counter() - start


def steady_figures(loaded, texts: list[str], folder: Path, small: int = 40,
                   layouts: tuple[str, ...] = ("rows", "segments"),
                   profiles: tuple[str, ...] = ("full", "states")) -> list[Figure]:
    """Steady-state seconds per prompt of ingestion and of the forward pass, their ratio, and bytes on disk.

    Args:
        loaded: The model.
        texts: The prompts of the large run (at least ``small + 200``); the small run takes the first ``small``.
        folder: Where the stores go.
        small: Prompts of the small run.
        layouts: Store layouts measured.
        profiles: Capture profiles measured.
    """
    from geomap.bench.store_bench import flop_bound

    n = len(texts) - small
    fwd = (_forward_seconds(loaded, texts) - _forward_seconds(loaded, texts[:small])) / n
    figs = [judged("steady state: forward with output_hidden_states", fwd, "s/prompt",
                   note=f"({len(texts)} - {small} prompts) differenced, batches of 8")]
    per_layer = loaded.anatomy.n_layers + 1
    for layout in layouts:
        for profile in profiles:
            t_small, i_small, tokens_small, size_small = _ingest_seconds(loaded, texts[:small],
                                                                         folder / "steady-s.duckdb", profile, layout)
            t_large, i_large, tokens, size = _ingest_seconds(loaded, texts, folder / "steady-l.duckdb", profile,
                                                             layout)
            per = (t_large - t_small) / n
            ratio = fwd / per
            what = f"{profile} profile, {layout} layout"
            figs.append(judged(f"steady state: ingestion ({what})", per, "s/prompt",
                               note=f"FAISS build apart; whole run of {len(texts)} prompts with it: "
                                    f"{t_large + i_large:.1f} s, of {small}: {t_small + i_small:.1f} s"))
            figs.append(judged(f"fixed cost: FAISS build when the run ends ({what})", i_large, "s",
                               note=f"{i_large / len(texts) * 1000:.1f} ms per prompt of the {len(texts)}-prompt "
                                    f"run; {i_small:.2f} s for {small} prompts"))
            if profile == "states":
                figs.append(judged(f"steady state: states-only ingestion vs forward with hidden states ({layout} "
                                   "layout)", ratio, "x", ">= 0.90" if layout == "segments" else None))
            else:
                bound = flop_bound(loaded, tokens, len(texts))
                figs.append(judged(f"steady state: default ingestion vs its FLOP bound ({layout} layout)",
                                   ratio / bound, "x", ">= 0.80" if layout == "segments" else None,
                                   note=f"ratio to the forward {ratio:.2f}x over a FLOP bound of {bound:.2f}x"))
            vector = loaded.anatomy.d_model * 4
            figs.append(judged(f"bytes on disk per token-layer ({what})", size / (tokens * per_layer), "B",
                               ("<= 10000" if profile == "full" else f"<= {1.15 * vector:.0f}")
                               if layout == "segments" else None,
                               note=f"every file of the store; the float32 state vector alone is {vector} B"))
            figs.append(judged(f"bytes on disk per token-layer, differenced ({what})",
                               (size - size_small) / ((tokens - tokens_small) * per_layer), "B",
                               ("<= 10000" if profile == "full" else f"<= {1.15 * vector:.0f}")
                               if layout == "segments" else None,
                               note=f"the {len(texts)}-prompt store less the {small}-prompt one: the store's fixed "
                                    "costs (its vocabulary) cancel out, as in the seconds above"))
    return figs

"""``geomap bench``: geomap measured side by side with the bare model, the peers and the machine's limits."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from geomap.bench.core import Figure, machine

SUBJECTS = ["the storm over the northern coast", "the stock market after the announcement", "my neighbour's old cat",
            "the bridge across the river", "this recipe for lemon cake", "the night train to Lyon", "our football team",
            "the water level of the lake", "the new phone everyone talks about", "her first novel about the war"]
FRAMES = ["According to the morning news, {} is", "Everyone in the village agreed that {} was",
          "After a long and difficult week, {} will probably", "For as long as anyone can remember, {} has always been"]


def prompts(n: int) -> list[str]:
    """``n`` English prompts of 12 to 20 tokens (subjects × frames, numbered past 40 so that every one is new)."""
    base = [f.format(s) for f in FRAMES for s in SUBJECTS]
    return [base[i] if i < len(base) else f"{base[i % len(base)]} ({i})" for i in range(n)]


def short_prompts(n: int) -> list[str]:
    """``n`` distinct short prompts (a subject and a number, 8 to 14 tokens): what steady-state ingestion is fed."""
    return [f"{SUBJECTS[i % len(SUBJECTS)]} ({i})" for i in range(n)]


PARTS = ("interventions",)


def run_bench(model: str = "gemma-3-270m", quick: bool = False, workdir: Path | None = None,
              say: Callable[[str], None] = print, only: str | None = None) -> tuple[dict, list[Figure], float]:
    """Measure every figure; returns ``(machine, figures, seconds)``.

    Args:
        model: The model measured (a preset, directory or hub id).
        quick: Fewer prompts, rounds and sizes (about 20 minutes on 2 cores; the full run takes hours).
        workdir: Where temporary stores go (default a temporary folder, removed afterwards).
        say: Progress lines.
        only: One part of `PARTS` alone (``interventions``: the causal-trace sweep against its bare forwards, and
            the storage per intervention).
    """
    from geomap.bench import (
        capture_bench,
        cli_bench,
        intervene_bench,
        query_bench,
        ray_bench,
        steady_bench,
        store_bench,
    )
    from geomap.models import load_model

    start = time.perf_counter()
    repeats = 3
    n_prompts = 16 if quick else 32
    sizes = (10_000, 50_000) if quick else (10_000, 100_000, 1_000_000)
    memory_counts = (100, 200, 300) if quick else (100, 1000, 5000)  # 100: DuckDB's buffer has filled
    n_map = 5_000 if quick else 50_000
    loaded = load_model(model, device="cpu")
    texts = prompts(n_prompts)
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp)
        if only == "interventions":
            say("interventions: a causal-trace sweep beside its bare forwards; storage per intervention")
            figures += intervene_bench.intervene_figures(loaded, folder, repeats)
            return machine(), figures, time.perf_counter() - start
        say("capture: geomap, forward, forward with hidden states, peers")
        figures += capture_bench.capture_figures(loaded, texts, repeats)
        say("lens: against a same-shape matmul")
        figures += capture_bench.lens_figures(loaded, 2048, repeats)
        say("store: geomap's writer, bare DuckDB, fsync")
        figures += store_bench.store_figures(loaded, texts, folder, repeats)
        say("end to end and storage size")
        figures += store_bench.end_to_end_figures(loaded, texts, folder, repeats)
        say("steady state: 40 and 240 prompts differenced, per profile and store layout")
        figures += steady_bench.steady_figures(loaded, short_prompts(240), folder,
                                               layouts=("segments",) if quick else ("rows", "segments"))
        say("cold starts: geomap sql, a rerun with nothing new, beside python -c pass")
        figures += cli_bench.cold_figures(model, texts[:4], folder, repeats)
        db = folder / "e.duckdb"
        say("interventions: a causal-trace sweep beside its bare forwards; storage per intervention")
        figures += intervene_bench.intervene_figures(loaded, folder, repeats)
        say("SQL, reports and projections")
        figures += query_bench.sql_figures(db)
        figures += query_bench.report_figures(db, loaded)
        base = query_bench.real_states(db, loaded.anatomy.n_layers // 2)
        figures += query_bench.projection_figures(base, n_map)
        say(f"kNN at {', '.join(f'{n:,}' for n in sizes)} states")
        figures += query_bench.knn_figures(base, sizes)
        say("ingestion on Ray (started locally, 2 workers) beside inline")
        figures += ray_bench.ray_figures(model, prompts(48 if quick else 96), folder, 2 if quick else repeats)
        say(f"memory at {', '.join(map(str, memory_counts))} prompts (fresh processes)")
        figures += store_bench.memory_figures(model, texts, memory_counts, folder)
    return machine(), figures, time.perf_counter() - start


def run_segment_bench(model: str = "gemma-3-270m", n_states: int = 1_000_000, workdir: Path | None = None,
                      say: Callable[[str], None] = lambda _: None) -> tuple[dict, list[Figure], float]:
    """The query bars of a large segments store (`geomap.bench.segment_bench`): (machine, figures, seconds)."""
    from geomap.bench import segment_bench
    from geomap.models import load_model

    start = time.perf_counter()
    loaded = load_model(model, device="cpu")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        say(f"a segments store of {n_states:,} states: 2 real prompts, the rest synthetic through the segment writer")
        figures = segment_bench.segment_figures(loaded, Path(tmp), n_states)
    return machine(), figures, time.perf_counter() - start

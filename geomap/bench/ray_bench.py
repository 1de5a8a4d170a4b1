"""The Ray engine beside the inline one: the same prompts into fresh stores, from the model's name to a stored run.

Two things are measured apart, because a study pays them differently. A run's fixed cost (Ray's actors start, each
imports torch and loads the model; the inline engine loads it once) is paid once per run, whatever its size. The
steady state, seconds per prompt once every worker delivers, is what a 100k-prompt study pays 100k times. The
steady state is timed from the moment the pipeline has filled (the inline engine's first stored batch; one merged
batch from each Ray worker) to the last merged batch, so the workers' model loading is not in it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from geomap.bench.core import Figure, judged, median
from geomap.bench.store_bench import fresh_path
from geomap.capture.config import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.ingest.engine_config import EngineConfig
from geomap.store.writer import PromptSpec

WORKERS = 2
BATCH = 8


class _Clock:
    """A run's whole time and its steady seconds per prompt, from the engine's progress callbacks."""

    def __init__(self, fill: int):
        self.fill, self.events, self.start = fill, [], time.perf_counter()

    def __call__(self, progress: dict) -> None:
        self.events.append((time.perf_counter(), progress["stored"]))

    def result(self) -> tuple[float, float]:
        whole = time.perf_counter() - self.start
        filled = next((t, n) for t, n in self.events if n >= self.fill)
        last = self.events[-1]
        return whole, (last[0] - filled[0]) / max(last[1] - filled[1], 1)


def _round(runs: dict[str, Callable[[_Clock], None]], fills: dict[str, int]) -> dict[str, tuple[float, float]]:
    out = {}
    for name, run in runs.items():
        clock = _Clock(fills[name])
        run(clock)
        out[name] = clock.result()
    return out


def ray_figures(model: str, texts: list[str], folder: Path, repeats: int) -> list[Figure]:
    """Ray started locally with 2 CPU workers against the inline engine, on the same prompts.

    Each round runs both from the model's name, as ``geomap run`` does: inline loads the model and ingests; Ray's
    actors each load it and the driver merges their batches. Ray itself is started once (a cluster outlives runs;
    its start-up is its own figure). ``texts`` should give each worker several batches (at least 6 batches in
    all), or the steady state is too short to time. Without Ray installed there are no Ray figures.
    """
    from geomap.ingest.ray_engine import RayMissingError, ingest_ray, require_ray
    from geomap.ingest.runs import RunOptions
    from geomap.models import load_model

    try:
        ray = require_ray()
    except RayMissingError:
        return []
    config, specs = CaptureConfig(), [PromptSpec(t) for t in texts]
    started = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    startup = time.perf_counter() - started
    runs = {
        "inline": lambda clock: ingest(load_model(model, device="cpu"), specs, fresh_path(folder, "inline.duckdb"),
                                       config, batch_size=BATCH, progress=False, on_progress=clock),
        "ray": lambda clock: ingest_ray(model, specs, fresh_path(folder, "ray.duckdb"),
                                        RunOptions(config, batch_size=BATCH, progress=False, on_progress=clock),
                                        engine=EngineConfig(kind="ray", workers=WORKERS), device="cpu"),
    }
    fills = {"inline": BATCH, "ray": WORKERS * BATCH}
    try:
        _round(runs, fills)  # warm-up: page cache, compiled kernels, Ray's worker pool
        got = [_round(runs, fills) for _ in range(repeats)]
    finally:
        ray.shutdown()
    whole = {k: [g[k][0] for g in got] for k in runs}
    steady = {k: [g[k][1] for g in got] for k in runs}
    fixed = {k: median([w - s * len(texts) for w, s in zip(whole[k], steady[k])]) for k in runs}
    steady_ratio = median([r / i for r, i in zip(steady["ray"], steady["inline"])])
    threads = max(1, (os.cpu_count() or 1) // WORKERS)
    return [
        judged(f"Ray local ({WORKERS} workers) vs inline, steady state", steady_ratio, "x", "<= 1.15",
               note=f"seconds per prompt once every worker delivers ({len(texts)} prompts, batches of {BATCH}): "
               f"inline {median(steady['inline']):.2f} s, Ray {median(steady['ray']):.2f} s ({WORKERS} actors of "
               f"{threads} threads)"),
        judged(f"Ray local ({WORKERS} workers) vs inline, whole run", median([r / i for r, i in zip(
            whole["ray"], whole["inline"])]), "x", note=f"{len(texts)} prompts from the model name to a stored, "
               f"indexed run: inline {median(whole['inline']):.1f} s, Ray {median(whole['ray']):.1f} s"),
        judged("Ray fixed cost per run", fixed["ray"], "s", note=f"whole run less steady state x prompts (inline: "
               f"{fixed['inline']:.1f} s): actors start, import torch and load the model each"),
        judged("Ray local start-up", startup, "s", note="ray.init on this machine, once per session or cluster"),
    ]

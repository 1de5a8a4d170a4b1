"""The Ray engine beside the inline one: the same prompts into fresh stores, from the model's name to a stored run."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from geomap.bench.core import Figure, judged, median, median_ratio, rounds
from geomap.bench.store_bench import _fresh
from geomap.capture.config import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.ingest.engine_config import EngineConfig
from geomap.store.writer import PromptSpec

WORKERS = 2


def ray_figures(model: str, texts: list[str], folder: Path, repeats: int) -> list[Figure]:
    """Ray started locally with 2 CPU workers against the inline engine, on the same prompts.

    Each round runs both from the model's name, as ``geomap run`` does: inline loads the model and ingests; Ray's
    actors each load it and the driver merges their batches. Ray itself is started once (a cluster outlives runs;
    its start-up is its own figure). Without Ray installed there are no Ray figures.
    """
    from geomap.ingest.ray_engine import RayMissingError, ingest_ray, require_ray
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
    try:
        def inline():
            ingest(load_model(model, device="cpu"), specs, _fresh(folder, "inline.duckdb"), config, progress=False)

        def on_ray():
            ingest_ray(model, specs, _fresh(folder, "ray.duckdb"), config, progress=False, device="cpu",
                       engine=EngineConfig(kind="ray", workers=WORKERS))

        t = rounds({"inline": inline, "ray": on_ray}, repeats)
    finally:
        ray.shutdown()
    return [
        judged(f"Ray local ({WORKERS} workers) vs inline ingestion", median_ratio(t["ray"], t["inline"]), "x",
               "<= 1.15", note=f"{len(texts)} prompts from the model name to a stored, indexed run; inline "
               f"{median(t['inline']):.1f} s, Ray {median(t['ray']):.1f} s ({WORKERS} actors of "
               f"{max(1, (os.cpu_count() or 1) // WORKERS)} threads, each loading the model)"),
        judged("Ray local start-up", startup, "s", note="ray.init on this machine, once per session or cluster"),
    ]

"""A pipeline's journey pages rendered by worker processes, each reading the store read-only.

Rendering a page is CPU-bound Python (reads, numpy, Jinja), so a build of many pages spreads its prompts over one
process per core (at most `MAX_WORKERS`). Each worker opens the store read-only (DuckDB lets several processes read a
file that none writes), keeps it open for all its pages with one `PageReads` of its own, and writes each prompt's
page and its continuation steps' pages, exactly as `geomap.report.api.journey_report` does in one process. Reports
never load a model and never write to the store: what they need was prepared before the workers start.

A worker that fails (a store another process holds for writing, a process killed) costs no page: the caller writes
whatever is missing itself, in its own process.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MAX_WORKERS = 4  # processes at most (each holds its own caches: a few hundred MB)
MIN_PROMPTS = 8  # fewer prompts than this are rendered in the calling process (a worker's start costs ~2 s)
ENV = "GEOMAP_REPORT_WORKERS"  # a fixed number of processes (1: render in the calling process)

_WORKER: dict = {}  # bounded: one worker process's setup (four keys), filled once by `_start`


def workers_for(n_prompts: int) -> int:
    """How many processes render ``n_prompts`` prompts' pages: ``$GEOMAP_REPORT_WORKERS``, else one per core."""
    if os.environ.get(ENV, "").strip():
        return max(1, int(os.environ[ENV]))
    if n_prompts < MIN_PROMPTS:
        return 1
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS, n_prompts))


def _start(db_path: str, folder: str, links) -> None:
    """A worker's setup: the store opened read-only, and the reads its pages share."""
    from geomap.report.shared import PageReads
    from geomap.store.handle import Store

    _WORKER.update(store=Store.open(db_path, "r"), folder=Path(folder), links=links, shared=PageReads(build=True))


def _render(prompt_id: int) -> int:
    """Write one prompt's journey page and its continuation steps' pages (in a worker)."""
    from geomap.report.api import journey_report
    from geomap.report.links import journey_name

    w = _WORKER
    journey_report(w["store"], prompt_id, out=w["folder"] / journey_name(prompt_id), links=w["links"], ready=True,
                   index=False, shared=w["shared"])
    return prompt_id


def render_journeys(db_path: Path, prompt_ids: list[int], folder: Path, links, workers: int,
                    progress: bool = True) -> set[int]:
    """Write these prompts' journey pages (and their steps' pages) in ``workers`` processes.

    Args:
        db_path: The store's file; no process may hold it for writing while the workers read it.
        prompt_ids: The prompts whose pages are written.
        folder: The reports folder.
        links: What the pages may link to (`geomap.report.links.Links`).
        workers: How many processes.
        progress: Show a progress bar.

    Returns:
        The prompts whose pages were written (all of them, unless a worker failed: the caller writes the rest).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    done: set[int] = set()
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
                                 initargs=(str(db_path), str(folder), links)) as pool:
            for prompt_id in tqdm(pool.map(_render, prompt_ids), total=len(prompt_ids), unit="report",
                                  desc="reports", disable=not progress, dynamic_ncols=True):
                done.add(prompt_id)
    except Exception as exc:  # noqa: BLE001 (any failure: the caller writes what is missing in its own process)
        log.warning("report workers stopped (%s: %s); writing the remaining pages in this process",
                    type(exc).__name__, exc)
    return done

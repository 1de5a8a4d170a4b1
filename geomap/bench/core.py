"""Benchmark plumbing: interleaved rounds, medians, figures with targets, the machine, and the output formats."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Figure:
    """One measured figure.

    Attributes:
        name: What was measured (stable, used as a key).
        value: The median over rounds.
        unit: Its unit (``x`` for a ratio).
        target: The bar it is held to, as text (``>= 0.90``), or None for an informative figure.
        met: Whether the target holds (None without a target).
        note: How it was measured, or what it is compared with.
    """

    name: str
    value: float
    unit: str
    target: str | None = None
    met: bool | None = None
    note: str = ""


def judged(name: str, value: float, unit: str, target: str | None = None, note: str = "") -> Figure:
    """A figure with its target checked (``>= x`` or ``<= x``)."""
    met = None
    if target is not None:
        op, bound = target.split()
        met = value >= float(bound) if op == ">=" else value <= float(bound)
    return Figure(name, float(value), unit, target, met, note)


def rounds(configs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each configuration ``repeats`` times, round-robin (a, b, c, a, b, c, ...), after ``warmup`` rounds.

    Returns:
        Seconds per call, per configuration, in round order (so ratios can be taken inside each round).
    """
    for _ in range(warmup):
        for fn in configs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of ``numerator[i] / denominator[i]``."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def median(values: list[float]) -> float:
    """The median."""
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered))) - 1))]


def machine() -> dict:
    """What the figures were measured on."""
    import duckdb
    import faiss
    import torch

    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            mem_gib = int(f.readline().split()[1]) / 2**20
    except OSError:
        mem_gib = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": None if mem_gib is None else round(mem_gib, 1),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "duckdb": duckdb.__version__, "faiss": faiss.__version__, "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def as_json(machine_info: dict, figures: list[Figure], extra: dict | None = None) -> dict:
    """``{machine, figures: [{name, value, unit, target, met, note}], ...}``."""
    return {"machine": machine_info, "figures": [asdict(f) for f in figures], **(extra or {})}


def as_text(figures: list[Figure]) -> str:
    """An aligned plain-text table."""
    rows = [(f.name, f"{f.value:.4g} {f.unit}", f.target or "", {True: "met", False: "MISSED", None: ""}[f.met],
             f.note) for f in figures]
    widths = [max(len(r[i]) for r in rows + [("figure", "value", "target", "", "note")]) for i in range(4)]
    head = ("figure", "value", "target", "", "note")
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in [head, *rows])


def as_markdown(machine_info: dict, figures: list[Figure], command: str, seconds: float) -> str:
    """The body of docs/benchmarks.md."""
    lines = ["| figure | value | target | met | how |", "|---|---|---|---|---|"]
    for f in figures:
        met = {True: "yes", False: "**no**", None: ""}[f.met]
        lines.append(f"| {f.name} | {f.value:.4g} {f.unit} | {f.target or ''} | {met} | {f.note} |")
    info = ", ".join(f"{k} {v}" for k, v in machine_info.items() if v is not None)
    return (f"Measured with `{command}` in {seconds / 60:.1f} min on: {info}.\n\n" + "\n".join(lines) + "\n")

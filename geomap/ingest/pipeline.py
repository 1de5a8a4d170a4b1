"""Batch pipelines: a TOML file names prompt sources, a model, capture options and a store."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from geomap.capture.config import CaptureConfig
from geomap.errors import GeomapError
from geomap.ingest.sources import read_source
from geomap.models.presets import DEFAULT_MODEL
from geomap.store.writer import PromptSpec

VECTOR_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Pipeline:
    """A parsed pipeline file.

    Attributes:
        name: Pipeline name (defaults to the file's stem).
        model: Preset, directory or hub id.
        store: DuckDB path (relative paths are relative to the working directory).
        batch_size: Prompts per forward pass (and per DuckDB transaction).
        capture: Capture options.
        vector_dtype: ``"float32"`` or ``"bfloat16"`` storage of state vectors.
        sources: ``(path, format or None, tags)`` per source; paths relative to the pipeline file.
        reports: Folder for HTML reports written after the run (a journey report per prompt, the run report and
            ``index.html``), or None for none.
        continuation_tokens: Greedy tokens `geomap run` generates and stores after each prompt (0: none), so a
            journey report's "append and repeat" section has steps to show.
    """

    name: str
    model: str
    store: Path
    batch_size: int
    capture: CaptureConfig
    vector_dtype: str
    sources: tuple[tuple[Path, str | None, tuple[str, ...]], ...]
    reports: Path | None = None
    continuation_tokens: int = 0

    def prompts(self) -> list[PromptSpec]:
        """Read every source, in order."""
        return [spec for path, fmt, tags in self.sources for spec in read_source(path, fmt, tags)]


def _positions(value):
    return tuple(value) if isinstance(value, list) else value


def _continuation(path: Path, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 256:
        raise GeomapError(f"{path}: continuation_tokens must be a whole number from 0 to 256, not {value!r}")
    return value


def load_pipeline(path: str | Path) -> Pipeline:
    """Parse and check a pipeline TOML file.

    Raises:
        GeomapError: Invalid TOML, an unknown key, or a bad value; the message names the file.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise GeomapError(f"Cannot read pipeline {path}: {exc}") from None
    known = {"name", "model", "store", "batch_size", "capture", "sources", "reports", "continuation_tokens"}
    if unknown := set(data) - known:
        raise GeomapError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    cap = dict(data.get("capture", {}))
    vector_dtype = cap.pop("vector_dtype", "float32")
    if vector_dtype not in VECTOR_DTYPES:
        raise GeomapError(f"{path}: capture.vector_dtype must be one of {VECTOR_DTYPES} (float16 overflows on "
                          f"Gemma-3's residuals), not {vector_dtype!r}")
    for key in ("attn_positions", "lens_positions"):
        if key in cap:
            cap[key] = _positions(cap[key])
    if cap.get("layers") == "all":
        cap["layers"] = None
    try:
        capture = CaptureConfig(**cap)
    except (TypeError, ValueError) as exc:
        raise GeomapError(f"{path}: bad [capture] section: {exc}") from None
    sources = []
    for entry in data.get("sources", []):
        if "path" not in entry:
            raise GeomapError(f"{path}: every [[sources]] entry needs a path")
        sources.append(((path.parent / entry["path"]).resolve(), entry.get("format"), tuple(entry.get("tags", ()))))
    if not sources:
        raise GeomapError(f"{path}: no [[sources]]")
    batch = int(data.get("batch_size", 8))
    if batch < 1:
        raise GeomapError(f"{path}: batch_size must be at least 1")
    continuation = _continuation(path, data.get("continuation_tokens", 0))
    return Pipeline(name=str(data.get("name", path.stem)), model=str(data.get("model", DEFAULT_MODEL)),
                    store=Path(data.get("store", "data/geomap.duckdb")), batch_size=batch, capture=capture,
                    vector_dtype=vector_dtype, sources=tuple(sources),
                    reports=Path(data["reports"]) if data.get("reports") else None,
                    continuation_tokens=continuation)

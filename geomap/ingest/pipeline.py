"""Batch pipelines: a TOML file names prompt sources, a model, capture options and a store."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from geomap.capture.config import CaptureConfig
from geomap.errors import GeomapError
from geomap.ingest.engine_config import EngineConfig
from geomap.ingest.schema import VECTOR_DTYPES, validate_pipeline
from geomap.ingest.sources import read_source
from geomap.models.presets import DEFAULT_MODEL
from geomap.store.writer import PromptSpec

__all__ = ["VECTOR_DTYPES", "Pipeline", "load_pipeline"]


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
        continuation_tokens: Greedy tokens to generate and store after each prompt (0: none).
        engine: How the run is executed (the ``[engine]`` table: inline, or on Ray).
        interventions: The ``[[interventions]]`` sweeps run after the prompts are stored
            (`geomap.ingest.intervention_plan.InterventionSchema` each).
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
    engine: EngineConfig = field(default_factory=EngineConfig)
    interventions: tuple = ()

    def prompts(self) -> list[PromptSpec]:
        """Read every source, in order."""
        return [spec for path, fmt, tags in self.sources for spec in read_source(path, fmt, tags)]


def _toml_hint(text: str, message: str) -> str:
    """For TOML's "Invalid value": the line it names, and that text values need quotes."""
    where = re.search(r"at line (\d+)", message)
    if "Invalid value" not in message or where is None:
        return ""
    lines = text.splitlines()
    number = int(where.group(1))
    line = lines[number - 1].strip() if 0 < number <= len(lines) else ""
    return (f"; line {number} reads {line!r}: a text value needs quotes (name = \"journey\", "
            "tags = [\"demo\"]), a number or true/false does not")


def load_pipeline(path: str | Path) -> Pipeline:
    """Parse a pipeline TOML file and check all of it against `geomap.ingest.schema.PipelineSchema`.

    Raises:
        GeomapError: Unreadable or invalid TOML, an unknown key, or a bad value; the one-line message names the
            file, the key, the value given and what is allowed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
        data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise GeomapError(f"Cannot read pipeline {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise GeomapError(f"Cannot read pipeline {path}: {exc}{_toml_hint(text, str(exc))}") from None
    plans = _interventions(data.pop("interventions", []), str(path))
    spec = validate_pipeline(data, str(path))
    sources = tuple(((path.parent / s.path).resolve(), s.format, tuple(s.tags)) for s in spec.sources)
    return Pipeline(name=spec.name or path.stem, model=spec.model or DEFAULT_MODEL, store=Path(spec.store),
                    batch_size=spec.batch_size, capture=spec.capture.config(), vector_dtype=spec.capture.vector_dtype,
                    sources=sources, reports=Path(spec.reports) if spec.reports else None,
                    continuation_tokens=spec.continuation_tokens, engine=spec.engine,
                    interventions=plans)


def _interventions(entries, where: str) -> tuple:
    """The ``[[interventions]]`` tables, each validated (one-line errors naming the entry)."""
    from geomap.ingest.intervention_plan import validate_plan

    if not isinstance(entries, list):
        raise GeomapError(f"{where}: interventions must be [[interventions]] tables")
    return tuple(validate_plan(entry, f"{where} [[interventions]] #{i + 1}") for i, entry in enumerate(entries))

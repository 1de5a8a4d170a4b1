"""The validation layer at the boundary: what a pipeline file, the CLI's capture options and HTTP bodies may say.

One pydantic schema per shape (strict: no silent coercion of ``"50"`` to 50 or of ``"demo"`` to a list of
letters; unknown keys refused). `validate_pipeline` and `capture_config` turn a schema error into one
`GeomapError` line that names where (file or option), the key, the value given and what is allowed. The CLI
parses its option strings with `parse_positions` / `parse_layers` and then goes through `capture_config`, so a
pipeline key and its CLI option accept the same values. HTTP bodies can embed `CaptureSchema`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from geomap.capture.config import CaptureConfig
from geomap.errors import GeomapError
from geomap.ingest.engine_config import EngineConfig

FORMATS = ("txt", "jsonl", "csv", "parquet")
VECTOR_DTYPES = ("float32", "bfloat16")

ALLOWED = {
    "name": "a non-empty string",
    "model": "a string: a preset name, a local model directory or a hub id",
    "store": "a string: the DuckDB file's path",
    "reports": "a string: a folder for the HTML reports",
    "batch_size": "an integer of at least 1",
    "continuation_tokens": "a whole number from 0 to 256 (greedy tokens generated and stored after each prompt)",
    "capture": "a [capture] table",
    "attn_positions": '"last", "all" or a list of integer positions (negative ones count from the end)',
    "lens_positions": '"last", "all" or a list of integer positions (negative ones count from the end)',
    "layers": '"all" or a list of integer layer boundaries 0..L (negative ones count from the end)',
    "top_k": "an integer of at least 1",
    "mlp_top": "an integer of at least 1",
    "overflow": '"error" or "truncate"',
    "max_tokens": "a whole number of at least 2: a token budget per prompt, BOS included (over it, overflow applies)",
    "attn_base": '"sdpa" or "eager"',
    "profile": '"full" (everything) or "states" (only the residual stream and the final readout)',
    "vector_dtype": '"float32" or "bfloat16" (float16 overflows on Gemma-3\'s residuals)',
    "sources": "one or more [[sources]] tables, each with a path",
    "path": "a string: the prompt file's path, relative to the pipeline file",
    "format": '"txt", "jsonl", "csv" or "parquet" (default: from the file suffix)',
    "tags": 'a list of strings, e.g. tags = ["demo"]',
    "engine": 'an [engine] table, like [engine] kind = "ray"',
    "kind": '"inline" or "ray"',
    "address": "a non-empty string: a running Ray cluster's address (ray start --head prints it)",
    "workers": "a whole number of at least 1",
    "threads": "a whole number of at least 1",
    "max_restarts": "a whole number of at least 0",
    "max_task_retries": "a whole number of at least 0",
    "shards": "a non-empty string: a folder every machine of the cluster shares",
}
TABLES = ("capture", "sources", "engine")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


@dataclass(frozen=True)
class CaptureSchema(CaptureConfig):
    """Capture options: a `CaptureConfig` (declared once, in `geomap.capture.config`) and the vector dtype.

    What a pipeline's ``[capture]`` table, the CLI's capture options and an HTTP body's ``capture`` say.
    """

    vector_dtype: Literal["float32", "bfloat16"] = "float32"

    def config(self) -> CaptureConfig:
        """The `CaptureConfig` these options describe (``vector_dtype`` is a storage option, not part of it)."""
        return CaptureConfig(**{f.name: getattr(self, f.name) for f in fields(CaptureConfig)})


class SourceSchema(_Strict):
    """One ``[[sources]]`` entry."""

    path: Annotated[str, Field(min_length=1)]
    format: Literal["txt", "jsonl", "csv", "parquet"] | None = None
    tags: list[str] = []


class PipelineSchema(_Strict):
    """A whole pipeline file."""

    name: Annotated[str, Field(min_length=1)] | None = None
    model: Annotated[str, Field(min_length=1)] | None = None
    store: Annotated[str, Field(min_length=1)] = "data/geomap.duckdb"
    reports: Annotated[str, Field(min_length=1)] | None = None
    batch_size: Annotated[int, Field(ge=1)] = 8
    continuation_tokens: Annotated[int, Field(ge=0, le=256)] = 0
    capture: CaptureSchema = CaptureSchema()
    engine: EngineConfig = EngineConfig()
    sources: Annotated[list[SourceSchema], Field(min_length=1)]


def _key(loc: tuple) -> tuple[str, tuple]:
    """The dotted key a pydantic error location points at (union tags dropped), and its path in the data."""
    path: list = []
    for part in loc:
        if isinstance(part, int):
            if path and path[-1] == "sources" and len(path) == 1:
                path.append(part)
                continue
            break  # an item of a list value: the key is the list
        if path and path[-1] in ALLOWED and path[-1] not in TABLES:
            break  # a union member's tag after the key
        path.append(part)
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text, tuple(path)


def _lookup(data: Any, path: tuple) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")  # a model's unknown key, a dataclass's


def _keys_at(model: type[BaseModel], path: tuple) -> list[str]:
    """The keys allowed in the table that holds ``path``'s last key (``model`` is the top level's schema)."""
    if len(path) == 1:
        return [f.name for f in fields(model)] if model is CaptureSchema else list(model.model_fields)
    if path[0] in ("engine", "capture"):
        return [f.name for f in fields(EngineConfig if path[0] == "engine" else CaptureSchema)]
    return list(SourceSchema.model_fields)


def describe(exc: ValidationError, data: Any, where: str, model: type) -> str:
    """One line for a schema error: where, the key, the value given and what is allowed."""
    errors = exc.errors()
    error = next((e for e in errors if e["type"] in UNKNOWN), errors[0])  # `[[source]]`: say so first
    key, path = _key(tuple(error["loc"]))
    field = next((p for p in reversed(path) if isinstance(p, str)), "")
    if error["type"] in UNKNOWN:
        return f"{where}: unknown key {key!r}; allowed here: {', '.join(_keys_at(model, path))}"
    if error["type"] == "dataclass_type":
        return f"{where}: {key} = {_lookup(data, path)!r} is not allowed; {key} must be {ALLOWED.get(field)}"
    if error["type"] == "missing":
        return f"{where}: missing key {key!r}: {ALLOWED.get(field, 'required')}"
    value = _lookup(data, path)
    return f"{where}: {key} = {value!r} is not allowed; {key} must be {ALLOWED.get(field, error['msg'])}"


def validate_pipeline(data: dict, where: str) -> PipelineSchema:
    """Check a parsed pipeline file against `PipelineSchema`.

    Raises:
        GeomapError: One line naming ``where`` (the file), the key, the value and what is allowed.
    """
    try:
        return PipelineSchema.model_validate(data)
    except ValidationError as exc:
        raise GeomapError(describe(exc, data, where, PipelineSchema)) from None


_CAPTURE = TypeAdapter(CaptureSchema)  # validates capture options as a pipeline's [capture] table is validated


def capture_config(options: dict, where: str = "capture options") -> tuple[CaptureConfig, str]:
    """Validate capture options (as `CaptureSchema`) into a `CaptureConfig` and the vector dtype.

    Raises:
        GeomapError: One line naming the option, the value and what is allowed.
    """
    try:
        schema = _CAPTURE.validate_python(options)
    except ValidationError as exc:
        raise GeomapError(describe(exc, options, where, CaptureSchema)) from None
    return schema.config(), schema.vector_dtype


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        allowed = ALLOWED[what.lstrip("-").replace("-", "_")]
        raise GeomapError(f"{what} = {text!r} is not allowed; {what} must be {allowed}") from None


def parse_positions(text: str, option: str) -> str | list[int]:
    """A positions option as given on the command line: ``last``, ``all`` or comma-separated integers."""
    return text if text in ("last", "all") else _ints(text, option)


def parse_layers(text: str | None, option: str = "layers") -> str | list[int] | None:
    """A layers option as given on the command line: ``all`` or comma-separated integers."""
    return text if text in (None, "all") else _ints(text, option)

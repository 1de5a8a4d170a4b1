"""The validation layer at the boundary: what a pipeline file, the CLI's capture options and HTTP bodies may say.

One pydantic schema per shape (strict: no silent coercion of ``"50"`` to 50 or of ``"demo"`` to a list of
letters; unknown keys refused). `validate_pipeline` and `capture_config` turn a schema error into one
`GeomapError` line that names where (file or option), the key, the value given and what is allowed. The CLI
parses its option strings with `parse_positions` / `parse_layers` and then goes through `capture_config`, so a
pipeline key and its CLI option accept the same values. HTTP bodies can embed `CaptureSchema`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from geomap.capture.config import CaptureConfig
from geomap.errors import GeomapError

FORMATS = ("txt", "jsonl", "csv", "parquet")
VECTOR_DTYPES = ("float32", "bfloat16")

Positions = Literal["last", "all"] | list[int]

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
    "attn_base": '"sdpa" or "eager"',
    "profile": '"full" (everything) or "states" (only the residual stream and the final readout)',
    "vector_dtype": '"float32" or "bfloat16" (float16 overflows on Gemma-3\'s residuals)',
    "sources": "one or more [[sources]] tables, each with a path",
    "path": "a string: the prompt file's path, relative to the pipeline file",
    "format": '"txt", "jsonl", "csv" or "parquet" (default: from the file suffix)',
    "tags": 'a list of strings, e.g. tags = ["demo"]',
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CaptureSchema(_Strict):
    """Capture options (a pipeline's ``[capture]`` table, the CLI's capture options, an HTTP body's ``capture``)."""

    attn_positions: Positions = "last"
    lens_positions: Positions = "last"
    layers: Literal["all"] | list[int] | None = None
    top_k: Annotated[int, Field(ge=1)] = 50
    mlp_top: Annotated[int, Field(ge=1)] = 32
    overflow: Literal["error", "truncate"] = "error"
    attn_base: Literal["sdpa", "eager"] = "sdpa"
    profile: Literal["full", "states"] = "full"
    vector_dtype: Literal["float32", "bfloat16"] = "float32"

    def config(self) -> CaptureConfig:
        """The `CaptureConfig` these options describe (``vector_dtype`` is a storage option, not part of it)."""
        def positions(value):
            return tuple(value) if isinstance(value, list) else value

        return CaptureConfig(attn_positions=positions(self.attn_positions),
                             lens_positions=positions(self.lens_positions),
                             layers=None if self.layers in (None, "all") else tuple(self.layers), top_k=self.top_k,
                             mlp_top=self.mlp_top, overflow=self.overflow, attn_base=self.attn_base,
                             profile=self.profile)


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
        if path and path[-1] in ALLOWED and path[-1] not in ("capture", "sources"):
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


def describe(exc: ValidationError, data: Any, where: str, model: type[BaseModel]) -> str:
    """One line for a schema error: where, the key, the value given and what is allowed."""
    errors = exc.errors()
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # `[[source]]`: say so first
    key, path = _key(tuple(error["loc"]))
    field = next((p for p in reversed(path) if isinstance(p, str)), "")
    if error["type"] == "extra_forbidden":
        level = model if len(path) == 1 else CaptureSchema if path[0] == "capture" else SourceSchema
        return f"{where}: unknown key {key!r}; allowed here: {', '.join(level.model_fields)}"
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


def capture_config(options: dict, where: str = "capture options") -> tuple[CaptureConfig, str]:
    """Validate capture options (as `CaptureSchema`) into a `CaptureConfig` and the vector dtype.

    Raises:
        GeomapError: One line naming the option, the value and what is allowed.
    """
    try:
        schema = CaptureSchema.model_validate(options)
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

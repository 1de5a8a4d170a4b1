"""Prompt sources of a pipeline: txt (one prompt per line), jsonl, csv and parquet."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from geomap.capture.prompts import read_prompt_lines
from geomap.errors import PromptError
from geomap.store.writer import PromptSpec

FORMATS = ("txt", "jsonl", "csv", "parquet")


def _tags(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(t.strip() for t in value.split(";") if t.strip())
    return tuple(str(t) for t in value)


def _record(path: Path, where: str, row: dict, tags: tuple[str, ...]) -> PromptSpec:
    text = row.get("text")
    if not isinstance(text, str):
        raise PromptError(f"{path}, {where}: no 'text' field (got keys {sorted(row)})")
    source_id = row.get("id")
    return PromptSpec(text, str(path), None if source_id is None else str(source_id), tags + _tags(row.get("tags")))


def read_source(path: str | Path, fmt: str | None = None, tags: tuple[str, ...] = ()) -> list[PromptSpec]:
    """Read one prompt source; the format comes from ``fmt`` or the file suffix.

    jsonl, csv and parquet rows need a ``text`` field and may have ``id`` and ``tags`` (a list, or a string
    of ``;``-separated tags).

    Raises:
        PromptError: Missing file, unknown format, invalid UTF-8 or JSON, or a row without text; the
            message names the file and the line or row.
    """
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise PromptError(f"{path}: unknown prompt format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise PromptError(f"Prompt source {path} does not exist")
    if fmt == "txt":
        return [PromptSpec(text, str(path), None, tuple(tags)) for text in read_prompt_lines(path)]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return [_record(path, f"row {i + 1}", row, tuple(tags))
                for i, row in enumerate(pq.read_table(path).to_pylist())]
    try:
        content = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise PromptError(f"{path}, line {line}: not valid UTF-8") from None
    if fmt == "csv":
        return [_record(path, f"row {i + 1}", row, tuple(tags))
                for i, row in enumerate(csv.DictReader(io.StringIO(content)))]
    specs = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}, line {number}: invalid JSON ({exc.msg})") from None
        specs.append(_record(path, f"line {number}", row if isinstance(row, dict) else {}, tuple(tags)))
    return specs

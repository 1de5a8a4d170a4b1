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


def _tags(path: Path, where: str, value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(t.strip() for t in value.split(";") if t.strip())
    if isinstance(value, list | tuple) and all(isinstance(t, str) for t in value):
        return tuple(value)
    raise PromptError(f"{path}, {where}: 'tags' must be a list of strings or one ';'-separated string, not "
                      f"{type(value).__name__} {value!r}")


def _record(path: Path, where: str, row: dict, tags: tuple[str, ...]) -> PromptSpec:
    if "text" not in row:
        raise PromptError(f"{path}, {where}: no 'text' field (got keys {sorted(row)})")
    text = row["text"]
    if not isinstance(text, str):
        raise PromptError(f"{path}, {where}: 'text' must be a string, not {type(text).__name__} {text!r}")
    source_id = row.get("id")
    if source_id is not None and not isinstance(source_id, str | int):
        raise PromptError(f"{path}, {where}: 'id' must be a string or an integer, not {type(source_id).__name__}")
    return PromptSpec(text, str(path), None if source_id is None else str(source_id),
                      tags + _tags(path, where, row.get("tags")))


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise PromptError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None


def read_source(path: str | Path, fmt: str | None = None, tags: tuple[str, ...] = ()) -> list[PromptSpec]:
    """Read one prompt source; the format comes from ``fmt`` or the file suffix.

    jsonl, csv and parquet rows need a string ``text`` field and may have ``id`` (string or integer) and ``tags``
    (a list of strings, or a string of ``;``-separated tags). A UTF-8 byte-order mark at the start is dropped.

    Raises:
        PromptError: Missing file, unknown format, invalid UTF-8, JSON or parquet, or a row without text or
            with a field of the wrong type; the message names the file and the line or row.
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
        return [_record(path, f"row {i + 1}", row, tuple(tags)) for i, row in enumerate(_parquet_rows(path))]
    try:
        content = path.read_bytes().decode("utf-8-sig")  # a leading byte-order mark is not part of the text
    except UnicodeDecodeError as exc:
        line = path.read_bytes().removeprefix(b"\xef\xbb\xbf")[: exc.start].count(b"\n") + 1
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

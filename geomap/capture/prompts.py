"""Reading prompt files: one prompt per line, strictly UTF-8, with errors that name file and line."""

from __future__ import annotations

from pathlib import Path

from geomap.errors import PromptError


def read_prompt_lines(path: str | Path) -> list[str]:
    """Read a text file of prompts, one per line; blank lines and a leading UTF-8 byte-order mark are skipped.

    Raises:
        PromptError: The file is missing or a line is not valid UTF-8 (the message names file and line).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PromptError(f"Cannot read prompt file {path}: {exc.strerror}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the first prompt
    prompts = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PromptError(
                f"{path}, line {number}: not valid UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
            ) from None
        if line.strip():
            prompts.append(line)
    return prompts

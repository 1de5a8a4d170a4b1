r"""Terminal-safe output: control characters in stored text are shown, never obeyed by the terminal.

A prompt or token may hold escape sequences (``\x1b]0;title\x07`` retitles a terminal, ``\x1b[2J`` clears it).
Every command writes through `VisibleStream` (installed once, by the ``geomap`` group), which shows C0 controls
(but newline and tab) as ``\x1b``-style escapes, and DEL, C1 controls and the invisible bidirectional and
direction marks as ``\u202e``-style ones. JSON output stays exact: ``json.dumps`` already writes
C0 controls as ``\u001b``, and the stream writes the others as ``\u007f``-style escapes, which a JSON parser
reads back as the same characters.
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

_C0 = re.compile(r"[\x00-\x08\x0b-\x1f]")
_OTHER = re.compile(r"[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(text: str, newlines: bool = True) -> str:
    r"""``text`` with terminal control characters written out visibly.

    Args:
        text: Any text.
        newlines: Keep newlines (and tabs) as they are; else show them as ``\n`` and ``\t`` too.
    """
    text = _C0.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    text = _OTHER.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    if not newlines:
        text = text.replace("\n", "\\n").replace("\t", "\\t")
    return text


class VisibleStream:
    """A text stream wrapper that writes `visible` text to the stream it wraps."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        """Write ``text`` with its control characters shown."""
        self._stream.write(visible(text) if isinstance(text, str) else text)
        return len(text)

    def __getattr__(self, name: str):
        if name == "buffer":  # no way around the escaping (click would write to a stream's buffer directly)
            raise AttributeError(name)
        return getattr(self._stream, name)


def install() -> None:
    """Route ``sys.stdout`` and ``sys.stderr`` through `VisibleStream`, once.

    Carriage returns on stderr (progress bars) are written as they are.
    """
    if not isinstance(sys.stdout, VisibleStream):
        sys.stdout = VisibleStream(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, VisibleStream):
        sys.stderr = _StderrStream(sys.stderr)  # type: ignore[assignment]


class _StderrStream(VisibleStream):
    def write(self, text: str) -> int:
        if not isinstance(text, str):
            return self._stream.write(text)
        self._stream.write("\r".join(visible(part) for part in text.split("\r")))
        return len(text)

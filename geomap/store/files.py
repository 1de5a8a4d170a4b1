"""Durable files: write to a temporary file with fsync and a sha256, then rename it into place atomically."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from types import GeneratorType

import faiss


def write_temp(tmp: Path, content: faiss.Index | bytes | memoryview | Iterable) -> str:
    """Write an index (or bytes, or a buffer, or buffers in order: a list, or a generator) to ``tmp``, fsynced.

    Returns:
        The sha256 of what was written.
    """
    h = hashlib.sha256()
    with open(tmp, "wb") as f:

        def sink(block: bytes) -> None:
            h.update(block)
            f.write(block)

        if isinstance(content, bytes | memoryview):
            sink(content)
        elif isinstance(content, list | GeneratorType):
            for part in content:
                sink(part)
        else:  # the temporary writer is released (and flushed) when write_index returns
            faiss.write_index(content, faiss.PyCallbackIOWriter(sink))
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Fsync a file or a folder (a folder's fsync makes the renames and creations inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` over ``final`` and make the rename durable."""
    os.replace(tmp, final)
    fsync_path(final.parent)

"""Where geomap keeps per-machine caches: one rule for every stage (models, FAISS vocabulary indexes, templates)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """Where geomap keeps converted models and other per-machine caches (``$GEOMAP_HOME``)."""
    return Path(os.environ.get("GEOMAP_HOME") or Path.home() / ".cache" / "geomap")

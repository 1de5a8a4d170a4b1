"""`RunSummary`: what one run did, as every producer returns it (torch-free: the store-only CLI prints it)."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class RunSummary:
    """What one ingestion run did."""

    run_id: int | None
    stored: int
    skipped: int
    failed: int
    tokens: int
    seconds: float
    failures: tuple[str, ...]


def summary_json(summary: RunSummary) -> str:
    """A run summary as JSON."""
    return json.dumps(summary.__dict__)

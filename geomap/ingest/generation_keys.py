"""The keys of generations, computed without a model: a parent's stored prompt and the canonical decoding JSON.

Torch-free, so a rerun can tell whether a pipeline's continuations are stored before it loads anything
(`geomap.cli.rerun`); `geomap.ingest.generation` stores generations under the same keys.
"""

from __future__ import annotations

import json

from geomap.analysis.decoding import Strategy


def stored_parents(con, loaded, texts: list[str]) -> dict[str, tuple[int, str]]:
    """``{text: (id, key)}`` of the first stored (non-generated, done) prompt with each text and this model."""
    rows = con.execute("""SELECT p.text, min(p.id), arg_min(p.key, p.id) FROM prompts p JOIN runs r ON r.id = p.run_id
                          WHERE p.text IN (SELECT unnest(?)) AND r.weights_sha256 = ? AND p.parent_id IS NULL
                            AND p.status = 'done' GROUP BY p.text""", [texts, loaded.weights_hash]).fetchall()
    return {text: (int(pid), key) for text, pid, key in rows}


def decoding_json(strategy: Strategy, max_new_tokens: int, parent_key: str) -> str:
    """A generation's canonical decoding JSON (part of its key)."""
    return json.dumps({**strategy.to_dict(), "max_new_tokens": max_new_tokens, "parent": parent_key},
                      sort_keys=True, separators=(",", ":"))

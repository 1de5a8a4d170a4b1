"""Ids a user recognises: a stored prompt named by its store id, its source's id, or its content key.

Every command that takes ``--prompt`` accepts:

- a whole number: the store's id (``prompts.id``);
- the id the user's file gave it (``prompts.source_id``, the ``id`` field of a jsonl/csv/parquet row); a source id
  that is itself a number is written ``source:17``;
- its content key (``prompts.key``), whole or its first 8 or more hex digits.

When a source id names several stored prompts (the same file ingested with two capture configs), the user's prompt
(not a continuation or generation) is taken if it is the only one, else the error lists the candidates.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import click

from geomap.errors import GeomapError

_HEX = re.compile(r"[0-9a-f]{8,64}")
_LOOKUP = ("SELECT p.id, p.source_id, p.key, p.parent_id IS NULL AS user_prompt FROM prompts p "
           "WHERE p.source_id = ? OR (? AND starts_with(p.key, ?)) ORDER BY p.id LIMIT 20")


class PromptNotFound(GeomapError):
    """No stored prompt, or more than one, answers to the id the user gave."""


def _rows(db_path: Path, sql: str, params: list) -> list[tuple]:
    """Rows of a lookup, from the store or through the server that owns it."""
    from geomap.serve.client import find_server

    client = find_server(db_path)
    if client is not None:
        got = client.request("POST", "/sql", {"sql": sql, "params": params, "max_rows": 10_000})
        return [tuple(r) for r in got["rows"]]
    from geomap.store.db import NotFoundError
    from geomap.store.handle import Store

    if not Path(db_path).is_file():
        raise NotFoundError(f"No store at {db_path}; create one with `geomap run` or `geomap ingest`, or give --db.")
    with Store.use(db_path, "r") as opened, opened.snapshot() as con:
        return con.execute(sql, params).fetchall()


def resolve_prompt(db_path: Path, ref: str | int) -> int:
    """The store id of the prompt ``ref`` names (see the module docstring).

    Raises:
        PromptNotFound: No stored prompt answers to ``ref``, or several do.
    """
    text = str(ref).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    source = text[len("source:"):] if text.startswith("source:") else text
    key = text.lower()
    found = _rows(db_path, _LOOKUP, [source, bool(_HEX.fullmatch(key)), key])
    if not found:
        raise PromptNotFound(f"No stored prompt has the id, source id or key {text!r}; list them with "
                             "`geomap sql \"SELECT id, source_id, key, text FROM prompts\"`.")
    if len(found) > 1:
        users = [r for r in found if r[3]]
        if len(users) == 1:
            return int(users[0][0])
        ids = ", ".join(str(r[0]) for r in found)
        raise PromptNotFound(f"{text!r} names {len(found)} stored prompts (ids {ids}); give one of those ids.")
    return int(found[0][0])


def prompt_option(name: str = "prompt_id", required: bool = True, multiple: bool = False):
    """``--prompt ID|SOURCE_ID|KEY``, resolved to the store id before the command runs (it reads ``db``)."""
    help_text = ("Stored prompt: its store id, the id its source file gave it (source_id; `source:17` for a number), "
                 "or its content key (8+ hex digits).")

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            from geomap.store.db import default_db_path

            db = kwargs.get("db") or default_db_path()
            value = kwargs.get(name)
            if value is not None:
                kwargs[name] = (tuple(resolve_prompt(db, v) for v in value) if multiple
                                else resolve_prompt(db, value))
            return command(*args, **kwargs)

        return click.option("--prompt", name, type=str, required=required, multiple=multiple, metavar="ID",
                            help=help_text)(wrapper)

    return decorate


def stored_prompts(db_path: Path, keys: list[str]) -> list[dict]:
    """``[{prompt_id, source_id, key}]`` of the stored prompts among ``keys``, in the order of ``keys``."""
    if not keys:
        return []
    found = {r[2]: r for r in _rows(db_path, "SELECT id, source_id, key FROM prompts WHERE key IN (SELECT unnest(?))",
                                     [list(dict.fromkeys(keys))])}
    return [{"prompt_id": int(found[k][0]), "source_id": found[k][1], "key": k} for k in keys if k in found]


def mapping_line(stored: list[dict], shown: int = 12) -> str:
    """One line naming each prompt's store id beside the id the user knows it by (its source id, else its key)."""
    parts = [f"{p['source_id'] if p['source_id'] is not None else p['key'][:12]}={p['prompt_id']}" for p in stored]
    more = f" … and {len(parts) - shown} more (--json lists them all)" if len(parts) > shown else ""
    return f"prompt ids (yours=store id): {' '.join(parts[:shown])}{more}"

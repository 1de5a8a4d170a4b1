"""Generation into the store: greedy or sampled continuation, stored as a prompt linked to its parent.

The loop itself is analysis (`geomap.analysis.generate`); storing its journey and decisions is ingestion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from geomap.analysis.decoding import Strategy
from geomap.analysis.generate import capture_generation, eos_ids, generate_tokens, generation_config
from geomap.analysis.persist import decision_row, insert_rows
from geomap.capture.config import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.ingest.runs import ensure_vocab, model_identity, start_run
from geomap.store.db import connect, ensure_schema
from geomap.store.shards import write_batch
from geomap.store.vectors import sync_state_indexes
from geomap.store.writer import PromptSpec, prompt_key


def generate(db_path: str | Path, loaded, text: str, max_new_tokens: int, strategy: Strategy,
             config=None, vector_dtype: str = "float32") -> pd.DataFrame:
    """Generate after ``text``, store the generation as a prompt linked to its parent, with a decision per step.

    The parent is the stored prompt with this text and model (the first one), else ``text`` is stored first
    with ``config``; the parent is never modified. The
    generation's key covers the model, the capture config, the text, the strategy, its seed and
    ``max_new_tokens``, so asking again returns the stored generation.

    Returns:
        The generated tokens (``id, token, prob``: the model's own probability of each). ``attrs``
        holds ``prompt_id`` (the generation's row), ``parent_id``, ``text``, ``stopped`` and ``decision_ids``.
    """
    config = config or CaptureConfig()
    identity, config_json = model_identity(loaded), config.to_json()
    parent_key = _stored_prompt_key(db_path, loaded, text)
    if parent_key is None:
        ingest(loaded, [PromptSpec(text)], db_path, config, vector_dtype, progress=False)
        parent_key = prompt_key(identity, config_json, text)
    decoding = json.dumps({**strategy.to_dict(), "max_new_tokens": max_new_tokens, "parent": parent_key},
                          sort_keys=True, separators=(",", ":"))
    key = prompt_key(identity, config_json, text, decoding)
    con = connect(db_path)
    try:
        ensure_schema(con, loaded.anatomy.d_model)
        parent_id = con.execute("SELECT id FROM prompts WHERE key = ?", [parent_key]).fetchall()[0][0]
        found = con.execute("SELECT id FROM prompts WHERE key = ?", [key]).fetchall()
        if not found:
            generation = generate_tokens(loaded, text, max_new_tokens, strategy)
            journey = capture_generation(loaded, generation, generation_config(config, generation))
            ensure_vocab(con, loaded)
            run_id = start_run(con, loaded, config, vector_dtype, "generate")
            spec = PromptSpec(journey.text, "generate", None, (), parent_id, decoding, len(generation.prompt_ids))
            write_batch(con, run_id, vector_dtype, [(spec, key, journey)])
            prompt_id = con.execute("SELECT id FROM prompts WHERE key = ?", [key]).fetchall()[0][0]
            n0 = len(generation.prompt_ids)
            insert_rows(con, "decisions", [decision_row(d, prompt_id, n0 - 1 + i, "generate", i)
                                           for i, d in enumerate(generation.decisions)], with_id=True)
            sync_state_indexes(con, Path(db_path))
            con.execute("UPDATE runs SET status = 'done', finished_at = now() WHERE id = ?", [run_id])
        else:
            prompt_id = found[0][0]
        rows = con.execute("""SELECT d.id, d.chosen_id, v.text, d.model_prob, p.text
                              FROM decisions d JOIN prompts p ON p.id = d.prompt_id
                              JOIN runs r ON r.id = p.run_id
                              LEFT JOIN vocab v ON v.weights_sha256 = r.weights_sha256 AND v.token_id = d.chosen_id
                              WHERE d.prompt_id = ? AND d.source = 'generate' ORDER BY d.step""",
                           [prompt_id]).fetchall()
    finally:
        con.close()
    frame = pd.DataFrame({"id": [r[1] for r in rows], "token": [r[2] for r in rows],
                          "prob": [float(r[3]) for r in rows]})
    eos = bool(rows) and rows[-1][1] in eos_ids(loaded)
    frame.attrs.update(prompt_id=prompt_id, parent_id=parent_id, text=rows[0][4] if rows else text,
                       stopped="eos" if eos else "max_new_tokens", decision_ids=[r[0] for r in rows],
                       strategy=strategy.to_dict())
    return frame


def _stored_prompt_key(db_path: str | Path, loaded, text: str) -> str | None:
    """The key of an already stored (non-generated) prompt with this text and model, if any."""
    if not Path(db_path).exists():
        return None
    con = connect(db_path)
    try:
        ensure_schema(con)
        rows = con.execute("""SELECT p.key FROM prompts p JOIN runs r ON r.id = p.run_id
                              WHERE p.text = ? AND r.weights_sha256 = ? AND p.parent_id IS NULL
                                AND p.status = 'done' ORDER BY p.id LIMIT 1""",
                           [text, loaded.weights_hash]).fetchall()
    finally:
        con.close()
    return rows[0][0] if rows else None


def continue_prompts(db_path: str | Path, loaded, texts, max_new_tokens: int, config=None,
                     vector_dtype: str = "float32", progress: bool = True) -> int:
    """Store a short greedy continuation after each stored prompt (a pipeline's ``continuation_tokens``).

    Each continuation is a generation linked to its prompt (see `generate`); one already stored is reused, so a
    rerun adds nothing. Prompts that are not stored (failed) are skipped.

    Returns:
        How many continuations are stored for these texts.
    """
    from tqdm import tqdm

    if max_new_tokens < 1:
        return 0
    todo = [t for t in dict.fromkeys(texts) if _stored_prompt_key(db_path, loaded, t) is not None]
    for text in tqdm(todo, unit="prompt", desc="continuations", disable=not progress or not todo,
                     dynamic_ncols=True):
        generate(db_path, loaded, text, max_new_tokens, Strategy(), config, vector_dtype)
    return len(todo)

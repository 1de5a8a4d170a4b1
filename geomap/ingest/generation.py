"""Generation into the store: greedy or sampled continuation, stored as a prompt linked to its parent.

The loop itself is analysis (`geomap.analysis.generate`); storing its journey and decisions is ingestion.
"""

from __future__ import annotations

import pandas as pd

from geomap.analysis.decoding import Strategy
from geomap.analysis.generate import capture_generation, eos_ids, generate_tokens, generation_config
from geomap.analysis.persist import decision_row, insert_rows
from geomap.capture.config import CaptureConfig
from geomap.errors import PromptError
from geomap.ingest.engine import ingest
from geomap.ingest.generation_keys import decoding_json, stored_parents
from geomap.ingest.merger import Merged
from geomap.ingest.runs import Run, RunOptions, model_identity
from geomap.store.db import ensure_schema, storage_error
from geomap.store.handle import Store, StoreLike
from geomap.store.shards import write_batch
from geomap.store.writer import PromptSpec, prompt_key


def generate(store: StoreLike, loaded, text: str, max_new_tokens: int, strategy: Strategy,
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
    with Store.use(store, "w") as opened:
        return _generate(opened, loaded, text, max_new_tokens, strategy, config, vector_dtype, identity, config_json)


def _generate(store: Store, loaded, text: str, max_new_tokens: int, strategy: Strategy, config: CaptureConfig,
              vector_dtype: str, identity: str, config_json: str) -> pd.DataFrame:
    parent_key = _stored_prompt_key(store, loaded, text)
    if parent_key is None:
        ingest(loaded, [PromptSpec(text)], store, config, vector_dtype, progress=False)
        parent_key = prompt_key(identity, config_json, text)
    decoding = decoding_json(strategy, max_new_tokens, parent_key)
    key = prompt_key(identity, config_json, text, decoding)
    with store.writer() as con:
        ensure_schema(con, loaded.anatomy.d_model)
        parent_id = con.execute("SELECT id FROM prompts WHERE key = ?", [parent_key]).fetchall()[0][0]
        found = con.execute("SELECT id FROM prompts WHERE key = ?", [key]).fetchall()
        if not found:
            _store_generations(store, con, loaded, RunOptions(config, vector_dtype, pipeline="generate",
                                                              progress=False),
                               [(text, parent_id, decoding, key)], max_new_tokens, strategy)
            found = con.execute("SELECT id FROM prompts WHERE key = ?", [key]).fetchall()
        prompt_id = found[0][0]
        rows = con.execute("""SELECT d.id, d.chosen_id, v.text, d.model_prob, p.text
                              FROM decisions d JOIN prompts p ON p.id = d.prompt_id
                              JOIN runs r ON r.id = p.run_id
                              LEFT JOIN vocab v ON v.weights_sha256 = r.weights_sha256 AND v.token_id = d.chosen_id
                              WHERE d.prompt_id = ? AND d.source = 'generate' ORDER BY d.step""",
                           [prompt_id]).fetchall()
    frame = pd.DataFrame({"id": [r[1] for r in rows], "token": [r[2] for r in rows],
                          "prob": [float(r[3]) for r in rows]})
    eos = bool(rows) and rows[-1][1] in eos_ids(loaded)
    frame.attrs.update(prompt_id=prompt_id, parent_id=parent_id, text=rows[0][4] if rows else text,
                       stopped="eos" if eos else "max_new_tokens", decision_ids=[r[0] for r in rows],
                       strategy=strategy.to_dict())
    return frame


def _stored_prompt_key(store: Store, loaded, text: str) -> str | None:
    """The key of an already stored (non-generated) prompt with this text and model, if any."""
    with store.writer() as con:
        ensure_schema(con)
        found = stored_parents(con, loaded, [text])
    return found[text][1] if found else None


def continue_prompts(store: StoreLike, loaded, texts, max_new_tokens: int, config=None,
                     vector_dtype: str = "float32", progress: bool = True, batch_size: int = 8) -> int:
    """Store a short greedy continuation after each stored prompt (a pipeline's ``continuation_tokens``).

    Each continuation is stored as `generate` stores it (the same key, so either finds the other's), but all of
    them go into one run, ``batch_size`` generations a transaction (each with its decisions), and the FAISS
    indexes are brought up to date once at the end. One already stored is reused, so a rerun adds nothing; prompts
    that are not stored (failed) are skipped, and so is one whose continuation would not fit the context window.

    Returns:
        How many of these texts have a stored continuation.
    """
    if max_new_tokens < 1:
        return 0
    config = config or CaptureConfig()
    identity, config_json = model_identity(loaded), config.to_json()
    with Store.use(store, "w") as opened, opened.writer() as con:
        ensure_schema(con, loaded.anatomy.d_model)
        unique = list(dict.fromkeys(texts))
        parents = stored_parents(con, loaded, unique)
        wanted = []
        for text in (t for t in unique if t in parents):
            parent_id, parent_key = parents[text]
            decoding = decoding_json(Strategy(), max_new_tokens, parent_key)
            wanted.append((text, parent_id, decoding, prompt_key(identity, config_json, text, decoding)))
        stored = {r[0] for r in con.execute("SELECT key FROM prompts WHERE key IN (SELECT unnest(?))",
                                            [[w[3] for w in wanted]]).fetchall()}
        todo = [w for w in wanted if w[3] not in stored]
        if todo:
            options = RunOptions(config, vector_dtype, batch_size, "continue", progress)
            stored |= _store_generations(opened, con, loaded, options, todo, max_new_tokens, Strategy(),
                                         skip_overflow=True)
    return sum(w[3] in stored for w in wanted)


def _store_generations(store: Store, con, loaded, options: RunOptions, todo: list[tuple[str, int, str, str]],
                       max_new_tokens: int, strategy: Strategy, skip_overflow: bool = False) -> set[str]:
    """Generate after each ``(text, parent_id, decoding, key)``, store the generations and their decisions.

    One run for all of them, started with the first batch to store (no run that stored nothing); each batch of
    generations is one transaction with their decisions (a kill leaves none of a batch, so a rerun redoes it
    whole); the FAISS indexes are synced once at the end. An error marks the run ``failed``, as ingestion does.

    Returns:
        The keys stored (with ``skip_overflow``, a text whose generation would not fit the context window is left
        out; without it, that raises `PromptError`).
    """
    from tqdm import tqdm

    run, done = None, set()
    bar = tqdm(total=len(todo), unit="prompt", desc="continuations", disable=not options.progress, dynamic_ncols=True)
    try:
        for start in range(0, len(todo), options.batch_size):
            chunk = todo[start:start + options.batch_size]
            items, steps = _generate_batch(loaded, options.config, chunk, max_new_tokens, strategy, skip_overflow)
            bar.update(len(chunk))
            if not items:
                continue
            if run is None:  # a killed run of the same command is finished under its own id
                run = Run(store, con, loaded, options)
                run.start()

            def decisions(con, ids: dict[str, int], steps=steps) -> None:
                rows = [decision_row(d, ids[key], n0 - 1 + i, "generate", i)
                        for key, (n0, made, _) in steps.items() if key in ids for i, d in enumerate(made)]
                insert_rows(con, "decisions", rows, with_id=True)
                _store_step_logits(con, [(ids[key], n0 - 1 + i, z) for key, (n0, _, logits) in steps.items()
                                         if key in ids for i, z in enumerate(logits)])

            counts = write_batch(con, run.run_id, options.vector_dtype, items, run.texts, within=decisions)
            run.batch_merged(Merged(tuple(items), counts, ""))
            done |= set(steps)
        if run is not None:
            run.complete()
    except Exception as exc:
        if run is not None:
            run.failed(exc)
        elif (error := storage_error(exc, store.path)) is not None:
            raise error from None
        raise
    finally:
        bar.close()
    return done


def _store_step_logits(con, steps: list[tuple[int, int, object]]) -> None:
    """Store each generation step's full logits as ``step_logits`` rows, in its decision's transaction.

    The rows are ``final_logits``' chunks with a position: what exact decoding of a continuation step needs.
    """
    import pyarrow as pa

    from geomap.store.writer import logit_chunks

    if not steps:
        return
    tables = []
    for prompt_id, pos, logits in steps:
        t = logit_chunks(logits, prompt_id)
        tables.append(t.add_column(1, "pos", pa.array([pos] * t.num_rows, pa.int32())))
    con.register("_step_logits", pa.concat_tables(tables))
    try:
        con.execute("INSERT INTO step_logits (prompt_id, pos, chunk, logits) "
                    "SELECT prompt_id, pos, chunk, logits FROM _step_logits")
    finally:
        con.unregister("_step_logits")


def _generate_batch(loaded, config: CaptureConfig, todo, max_new_tokens: int, strategy: Strategy,
                    skip_overflow: bool) -> tuple[list, dict]:
    """Generate and capture each of ``todo``: the shard items, and ``{key: (prompt length, decisions)}``."""
    items, steps = [], {}
    for text, parent_id, decoding, key in todo:
        try:
            generation = generate_tokens(loaded, text, max_new_tokens, strategy)
        except PromptError:
            if not skip_overflow:
                raise
            continue  # its continuation does not fit the context window: nothing to store
        journey = capture_generation(loaded, generation, generation_config(config, generation))
        n0 = len(generation.prompt_ids)
        items.append((PromptSpec(journey.text, "generate", None, (), parent_id, decoding, n0), key, journey))
        steps[key] = (n0, generation.decisions, generation.step_logits)
    return items, steps

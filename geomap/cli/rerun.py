"""A rerun with nothing new answers without loading the model: prompt keys need only the model's identity."""

from __future__ import annotations

from pathlib import Path


def nothing_new(store: Path, pipe, prompts, device: str | None, as_json: bool, no_reports: bool) -> bool:
    """Answer a rerun with nothing to store from the model's identity alone (config, tokenizer, weights hash).

    The prompts' keys, and their continuations' keys, need no weights: when every one is stored, the run is reported
    as skipped (no run recorded) and its reports are brought up to date without loading the model.

    Returns:
        Whether it answered (False: something is missing, and the model must be loaded).
    """
    import time

    from geomap.ingest.runs import RunSummary

    if not store.is_file() or pipe.interventions:  # a pipeline's sweeps are checked by the model's run
        return False
    start = time.perf_counter()
    from geomap.models.skeleton import skeleton_model

    skeleton = skeleton_model(pipe.model, device=device or "cpu")
    from geomap.cli.store_cmds import prompt_keys_of

    keys = prompt_keys_of(skeleton, pipe.capture, prompts)
    wanted = set(keys) | set(_continuation_keys(store, pipe, prompts, skeleton))
    from geomap.store.handle import Store

    with Store.use(store, "r") as opened, opened.snapshot() as con:
        stored = {r[0] for r in con.execute("SELECT key FROM prompts WHERE key IN (SELECT unnest(?))",
                                            [sorted(wanted)]).fetchall()}
    if stored != wanted:
        return False
    from geomap.cli.store_cmds import report_summary, write_pipeline_reports

    summary = RunSummary(None, 0, len(set(keys)), 0, 0, time.perf_counter() - start, ())
    report_summary(summary, as_json, store, keys, loaded=False)
    if pipe.reports and not no_reports:
        write_pipeline_reports(store, pipe, prompts, None)
    return True


def _continuation_keys(store: Path, pipe, prompts, skeleton) -> list[str]:
    """The keys `continue_prompts` gives the continuations of ``prompts`` (none without ``continuation_tokens``)."""
    if not pipe.continuation_tokens:
        return []
    from geomap.analysis.decoding import Strategy
    from geomap.ingest.generation import decoding_json, stored_parents
    from geomap.ingest.runs import model_identity
    from geomap.store.handle import Store
    from geomap.store.writer import prompt_key

    texts = list(dict.fromkeys(spec.text for spec in prompts))
    with Store.use(store, "r") as opened, opened.snapshot() as con:
        parents = stored_parents(con, skeleton, texts)
    identity, config_json = model_identity(skeleton), pipe.capture.to_json()
    keys = [prompt_key(identity, config_json, t, decoding_json(Strategy(), pipe.continuation_tokens, parents[t][1]))
            for t in texts if t in parents]
    return keys  # a prompt with no stored parent (it failed) gets no continuation, as in `continue_prompts`

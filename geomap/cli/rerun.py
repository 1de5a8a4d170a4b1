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
    from geomap.cli.store_cmds import _keys

    keys = _keys(skeleton, pipe.capture, prompts)
    wanted = set(keys) | set(_continuation_keys(store, pipe, prompts, skeleton))
    from geomap.store.db import connect

    con = connect(store, read_only=True)
    try:
        stored = {r[0] for r in con.execute("SELECT key FROM prompts WHERE key IN (SELECT unnest(?))",
                                            [sorted(wanted)]).fetchall()}
    finally:
        con.close()
    if stored != wanted:
        return False
    from geomap.cli.store_cmds import _pipeline_reports, _report

    summary = RunSummary(None, 0, len(set(keys)), 0, 0, time.perf_counter() - start, ())
    _report(summary, as_json, store, keys, loaded=False)
    if pipe.reports and not no_reports:
        _pipeline_reports(store, pipe, prompts, None)
    return True


def _continuation_keys(store: Path, pipe, prompts, skeleton) -> list[str]:
    """The keys `continue_prompts` gives the continuations of ``prompts`` (none without ``continuation_tokens``)."""
    if not pipe.continuation_tokens:
        return []
    from geomap.analysis.decoding import Strategy
    from geomap.ingest.generation import _decoding, _stored_parents
    from geomap.ingest.runs import model_identity
    from geomap.store.db import connect
    from geomap.store.writer import prompt_key

    texts = list(dict.fromkeys(spec.text for spec in prompts))
    con = connect(store, read_only=True)
    try:
        parents = _stored_parents(con, skeleton, texts)
    finally:
        con.close()
    identity, config_json = model_identity(skeleton), pipe.capture.to_json()
    keys = [prompt_key(identity, config_json, t, _decoding(Strategy(), pipe.continuation_tokens, parents[t][1]))
            for t in texts if t in parents]
    return keys  # a prompt with no stored parent (it failed) gets no continuation, as in `continue_prompts`

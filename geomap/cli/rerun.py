"""A rerun with nothing new answers without loading the model: prompt keys need only the model's identity."""

from __future__ import annotations

import time
from pathlib import Path

from geomap.analysis.decoding import Strategy
from geomap.cli.store_cmds import report_summary, write_pipeline_reports
from geomap.ingest.generation_keys import decoding_json, stored_parents
from geomap.ingest.summary import RunSummary
from geomap.models.identity import ModelIdentity, identity_of
from geomap.store.handle import Store
from geomap.store.writer import prompt_key


def nothing_new(store: Path, pipe, prompts, device: str | None, as_json: bool, no_reports: bool) -> bool:
    """Answer a rerun with nothing to store from the model's identity alone (`models.identity`: no torch).

    The prompts' keys, and their continuations' keys, need no weights: when every one is stored, the run is reported
    as skipped (no run recorded) and its reports are brought up to date without loading the model.

    Returns:
        Whether it answered (False: something is missing, and the model must be loaded).
    """
    if not store.is_file() or pipe.interventions:  # a pipeline's sweeps are checked by the model's run
        return False
    start = time.perf_counter()
    identity = identity_of(pipe.model)
    if identity is None:  # a hub id, or a preset not converted yet: its skeleton tells (transformers, no weights)
        from geomap.cli import quiet_transformers
        from geomap.ingest.runs import model_identity
        from geomap.models.skeleton import skeleton_model

        quiet_transformers()
        skeleton = skeleton_model(pipe.model, device=device or "cpu")
        identity = ModelIdentity(*model_identity(skeleton).split(":", 1))
    config_json = pipe.capture.to_json()
    keys = [prompt_key(identity.key, config_json, spec.text) for spec in prompts]
    wanted = set(keys) | set(_continuation_keys(store, pipe, prompts, identity))
    with Store.use(store, "r") as opened, opened.snapshot() as con:
        stored = {r[0] for r in con.execute("SELECT key FROM prompts WHERE key IN (SELECT unnest(?))",
                                            [sorted(wanted)]).fetchall()}
    if stored != wanted:
        return False
    summary = RunSummary(None, 0, len(set(keys)), 0, 0, time.perf_counter() - start, ())
    report_summary(summary, as_json, store, keys, loaded=False)
    if pipe.reports and not no_reports:
        write_pipeline_reports(store, pipe, prompts, None)
    return True


def _continuation_keys(store: Path, pipe, prompts, identity: ModelIdentity) -> list[str]:
    """The keys `continue_prompts` gives the continuations of ``prompts`` (none without ``continuation_tokens``)."""
    if not pipe.continuation_tokens:
        return []
    texts = list(dict.fromkeys(spec.text for spec in prompts))
    with Store.use(store, "r") as opened, opened.snapshot() as con:
        parents = stored_parents(con, identity, texts)
    config_json = pipe.capture.to_json()
    keys = [prompt_key(identity.key, config_json, t,
                       decoding_json(Strategy(), pipe.continuation_tokens, parents[t][1]))
            for t in texts if t in parents]
    return keys  # a prompt with no stored parent (it failed) gets no continuation, as in `continue_prompts`

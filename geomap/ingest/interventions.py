"""An intervention sweep as a run: the fourth producer of the store, beside ingest, generation and continuation.

A sweep stores the clean journeys it needs (an ordinary ingestion of the prompts and sources it names), then runs
its specs in batches through `geomap.intervene` and writes each batch's ledger rows, deltas and effects in one
transaction. Specs already in the ledger are skipped, and a sweep stopped by a kill or a failure is taken up again
under its own run id by the same command, so one rerun leaves the store an uninterrupted sweep would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geomap.capture.config import CaptureConfig
from geomap.capture.lens import Unembed
from geomap.ingest.engine import ingest
from geomap.ingest.runs import Run, RunOptions, model_identity
from geomap.intervene.effects import delta_rows, effect_rows, lens_top1
from geomap.intervene.engine import prepare, run_specs
from geomap.intervene.sites import InterventionError
from geomap.intervene.spec import Spec, resolve
from geomap.models.loading import LoadedModel
from geomap.store.handle import Store
from geomap.store.interventions import ensure_intervention_tables, stored_keys, write_interventions
from geomap.store.writer import PromptSpec, prompt_key

PIPELINE = "intervene"


@dataclass(frozen=True)
class SweepSummary:
    """What one sweep did: its run, the interventions it stored and skipped, and their ledger ids."""

    run_id: int | None
    stored: int
    skipped: int
    seconds: float
    ids: tuple[int, ...]


def target_ids(loaded: LoadedModel, targets: Sequence[str]) -> list[int]:
    """Token ids of target strings, each one token (raise `InterventionError` otherwise)."""
    out = []
    for text in targets:
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InterventionError(f"target {text!r} is {len(ids)} tokens for this model; a target is one token")
        out.append(int(ids[0]))
    return out


def sweep(loaded: LoadedModel, specs: Sequence[Spec], db_path: str | Path, targets: Sequence[str] = (),
          name: str = "sweep", batch_size: int = 16, config: CaptureConfig | None = None) -> SweepSummary:
    """Run and store a sweep of interventions.

    Args:
        loaded: The model.
        specs: The interventions.
        db_path: The store.
        targets: Target tokens for the effects table (one token each); none: each prompt's clean top-1.
        name: The sweep's name, kept on each ledger row (a report groups by it).
        batch_size: Interventions per forward pass.
        config: Capture options of the clean journeys (the default capture otherwise).

    Returns:
        The summary; ``ids`` are the ledger ids of every spec given (stored now or before), in order.
    """
    start = time.perf_counter()
    config = config or CaptureConfig()
    wanted = target_ids(loaded, targets)
    texts = list(dict.fromkeys(t for s in specs for t in (s.prompt, s.source) if t is not None))
    clean = ingest(loaded, [PromptSpec(t) for t in texts], db_path, config, progress=False, index=False)
    identity = model_identity(loaded)
    keys = [spec.key(identity) for spec in specs]
    with Store.use(db_path, "w") as opened, opened.writer() as con:
        if clean.stored:  # the new clean journeys' states join the FAISS indexes (nothing to do on a rerun)
            from geomap.store.vectors import sync_state_indexes

            sync_state_indexes(con, opened.path)
        ensure_intervention_tables(con)
        width = loaded.anatomy.d_model
        prompt_ids = _prompt_ids(con, identity, config, texts)
        have = stored_keys(con, keys)
        todo = list({k: (s, k) for s, k in zip(specs, keys) if k not in have}.values())
        run = Run(opened, con, loaded, RunOptions(config, "float32", pipeline=PIPELINE, progress=False, index=False))
        run_id = run.start(needed=bool(todo))  # the run lifecycle, as every producer: start, complete or failed
        if run_id is not None:
            try:
                _run(con, loaded, todo, run_id, prompt_ids, wanted, name, batch_size, width)
                run.complete()
            except Exception as exc:
                run.failed(exc)
                raise
        ids = dict(con.execute("SELECT key, id FROM interventions WHERE key IN (SELECT unnest(?))",
                               [keys]).fetchall())
        return SweepSummary(run_id if todo else None, len(todo), len(specs) - len(todo),
                            time.perf_counter() - start, tuple(int(ids[k]) for k in keys))


def _prompt_ids(con, identity: str, config: CaptureConfig, texts: list[str]) -> dict[str, int]:
    config_json = config.to_json()
    out = {}
    for text in texts:
        rows = con.execute("SELECT id, status, error FROM prompts WHERE key = ?",
                           [prompt_key(identity, config_json, text)]).fetchall()
        if not rows or rows[0][1] != "done":
            raise InterventionError(f"prompt {text!r} could not be captured: {rows[0][2] if rows else 'missing'}")
        out[text] = int(rows[0][0])
    return out


def _run(con, loaded: LoadedModel, todo: list[tuple[Spec, str]], run_id: int, prompt_ids: dict[str, int],
         wanted: list[int], name: str, batch_size: int, width: int) -> None:
    if not todo:
        return
    specs = [s for s, _ in todo]
    base = prepare(loaded, specs, batch_size)
    unembed = Unembed(loaded.anatomy)
    clean_top1 = {text: lens_top1(unembed, b.resid[:, -1]) for text, b in base.items()}
    done = 0
    for outcomes in run_specs(loaded, specs, base, batch_size):
        ledger, deltas, effects = [], [], []
        for outcome in outcomes:
            spec, key = outcome.spec, todo[done][1]
            done += 1
            clean = base[spec.prompt]
            ids, probs = clean_top1[spec.prompt]
            ids, probs = ids.copy(), probs.copy()
            if outcome.first_layer <= loaded.anatomy.n_layers:
                new_ids, new_probs = lens_top1(unembed, outcome.resid[outcome.first_layer:, -1])
                ids[outcome.first_layer:], probs[outcome.first_layer:] = new_ids, new_probs
            deltas.append(delta_rows(outcome, (ids, probs)))
            targets = wanted or [int(np.argmax(clean.logits))]
            rows = effect_rows(outcome, clean, targets, clean_top1[spec.prompt][0], ids)
            for row in rows:
                row["token"] = loaded.tokenizer.decode([row["token_id"]])
            effects.append(rows)
            ledger.append({"key": key, "run_id": run_id, "prompt_id": prompt_ids[spec.prompt],
                           "source_prompt_id": prompt_ids.get(spec.source) if spec.source else None,
                           "operation": spec.operation, "site": spec.site.kind, "layer": spec.site.layer,
                           "head": spec.site.head, "positions": resolve(spec.positions, len(clean.ids)),
                           "coefficient": spec.coefficient, "seed": spec.seed, "sweep": name,
                           "first_layer": outcome.first_layer, "first_pos": outcome.first_pos,
                           "spec": json.dumps(spec.to_dict())})
        write_interventions(con, ledger, deltas, effects, width)

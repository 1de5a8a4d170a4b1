"""An intervention sweep as a run: the fourth producer of the store, beside ingest, generation and continuation.

A sweep stores the clean journeys it needs (an ordinary ingestion of the prompts and sources it names), then runs
its specs in batches through `geomap.intervene` and writes each batch's ledger rows, deltas and effects in one
transaction. Specs already in the ledger are skipped, and a sweep stopped by a kill or a failure is taken up again
under its own run id by the same command, so one rerun leaves the store an uninterrupted sweep would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from geomap.capture.config import CaptureConfig
from geomap.ingest.engine import ingest
from geomap.ingest.engine_config import EngineConfig
from geomap.ingest.runs import Run, RunOptions, model_identity
from geomap.intervene.engine import prepare, run_specs
from geomap.intervene.measure import Measure, Measured
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
          name: str = "sweep", batch_size: int = 16, config: CaptureConfig | None = None,
          engine: EngineConfig | None = None) -> SweepSummary:
    """Run and store a sweep of interventions.

    Args:
        loaded: The model.
        specs: The interventions.
        db_path: The store.
        targets: Target tokens for the effects table (one token each); none: each prompt's clean top-1.
        name: The sweep's name, kept on each ledger row (a report groups by it).
        batch_size: Interventions per forward pass.
        config: Capture options of the clean journeys (the default capture otherwise).
        engine: ``kind = "ray"`` spreads the batches over Ray workers (`geomap.ingest.intervene_ray`); this process
            stays the only writer. Default inline.

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
        prompts = _prompts(con, identity, config, texts)
        have = stored_keys(con, keys)
        todo = list({k: (s, k) for s, k in zip(specs, keys) if k not in have}.values())
        run = Run(opened, con, loaded, RunOptions(config, "float32", pipeline=PIPELINE, progress=False, index=False))
        run_id = run.start(needed=bool(todo))  # the run lifecycle, as every producer: start, complete or failed
        if run_id is not None:
            try:
                if todo:
                    measured = _measured(loaded, [s for s, _ in todo], wanted, batch_size, engine)
                    _store(con, measured, [k for _, k in todo], _Ledger(run_id, prompts, name),
                           loaded.anatomy.d_model)
                run.complete()
            except Exception as exc:
                run.failed(exc)
                raise
        ids = dict(con.execute("SELECT key, id FROM interventions WHERE key IN (SELECT unnest(?))",
                               [keys]).fetchall())
        return SweepSummary(run_id if todo else None, len(todo), len(specs) - len(todo),
                            time.perf_counter() - start, tuple(int(ids[k]) for k in keys))


def _prompts(con, identity: str, config: CaptureConfig, texts: list[str]) -> dict[str, tuple[int, int]]:
    """Each text's stored prompt: ``(id, n_tokens)``."""
    config_json = config.to_json()
    out = {}
    for text in texts:
        rows = con.execute("SELECT id, status, error, n_tokens FROM prompts WHERE key = ?",
                           [prompt_key(identity, config_json, text)]).fetchall()
        if not rows or rows[0][1] != "done":
            raise InterventionError(f"prompt {text!r} could not be captured: {rows[0][2] if rows else 'missing'}")
        out[text] = (int(rows[0][0]), int(rows[0][3]))
    return out


def measure_inline(loaded: LoadedModel, specs: Sequence[Spec], wanted: Sequence[int],
                   batch_size: int) -> Iterator[list[Measured]]:
    """The specs run ``batch_size`` per forward pass in this process, each batch measured."""
    base = prepare(loaded, specs, batch_size)
    measure = Measure(loaded, base, wanted)
    for outcomes in run_specs(loaded, specs, base, batch_size):
        yield measure.batch(outcomes)


def _measured(loaded, specs, wanted, batch_size, engine: EngineConfig | None) -> Iterator[list[Measured]]:
    if engine is None or engine.kind == "inline":
        return measure_inline(loaded, specs, wanted, batch_size)
    from geomap.ingest.intervene_ray import measure_ray

    return measure_ray(loaded, specs, wanted, batch_size, engine)


@dataclass(frozen=True)
class _Ledger:
    """What a ledger row takes from the sweep: its run, the stored prompts (id, tokens) and the sweep's name."""

    run_id: int
    prompts: dict[str, tuple[int, int]]
    name: str

    def row(self, m: Measured, key: str) -> dict:
        spec = m.spec
        prompt_id, n_tokens = self.prompts[spec.prompt]
        return {"key": key, "run_id": self.run_id, "prompt_id": prompt_id,
                "source_prompt_id": self.prompts[spec.source][0] if spec.source else None,
                "operation": spec.operation, "site": spec.site.kind, "layer": spec.site.layer,
                "head": spec.site.head, "positions": resolve(spec.positions, n_tokens),
                "coefficient": spec.coefficient, "seed": spec.seed, "sweep": self.name,
                "first_layer": m.first_layer, "first_pos": m.first_pos, "spec": json.dumps(spec.to_dict())}


def _store(con, batches: Iterable[list[Measured]], keys: list[str], ledger: _Ledger, width: int) -> None:
    """Write each batch in its own transaction on a writer thread, while the next batch is computed.

    One batch at most waits for the thread, so batches commit in order and a kill loses at most the batches not
    committed yet (the rerun computes them again).
    """
    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="geomap-intervene-writer") as writer:
        pending = None
        for batch in batches:
            rows = [ledger.row(m, keys[done + i]) for i, m in enumerate(batch)]
            done += len(batch)
            if pending is not None:
                pending.result()
            pending = writer.submit(write_interventions, con, rows, [m.delta for m in batch],
                                    [m.effects for m in batch], width)
        if pending is not None:
            pending.result()

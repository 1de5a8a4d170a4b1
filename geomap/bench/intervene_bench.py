"""Interventions measured: a causal-trace sweep beside the bare forward passes it needs, and its storage."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from geomap.bench.core import Figure, judged, median, median_ratio, rounds

CLEAN, SUBJECT = "The capital of France is", "France"
BATCH = 16


def _specs(loaded, seed: int):
    from geomap.ingest.intervention_plan import subject_positions
    from geomap.intervene import Noise, Site, Spec

    n = len(loaded.tokenizer(CLEAN)["input_ids"])
    noise = Noise(subject_positions(loaded, CLEAN, SUBJECT), 3.0, seed)
    return [Spec("trace", CLEAN, Site("resid", layer), (pos,), noise=noise)
            for layer in range(loaded.anatomy.n_layers + 1) for pos in range(n)]


def intervene_figures(loaded, folder: Path, repeats: int) -> list[Figure]:
    """Sweep vs bare forwards (the same batch shapes, no hooks, no storage), and bytes per intervention."""
    from geomap.ingest.interventions import sweep
    from geomap.intervene import prepare, run_specs
    from geomap.intervene.measure import Measure

    db = folder / "intervene.duckdb"
    sweep(loaded, _specs(loaded, 0), db, name="bench")  # stores the clean journey once; rounds add new seeds
    n_specs = len(_specs(loaded, 0))
    ids = torch.tensor(loaded.tokenizer(CLEAN)["input_ids"])
    seeds = iter(range(1, 10_000))
    n_bounds = loaded.anatomy.n_layers + 1

    @torch.no_grad()
    def forwards():
        loaded.model(input_ids=ids[None], use_cache=False, logits_to_keep=1)  # the clean baseline
        for start in range(0, n_specs, BATCH):
            rows = min(BATCH, n_specs - start)
            loaded.model(input_ids=ids[None].expand(rows, -1), use_cache=False, logits_to_keep=1)

    def hooks_only():
        specs = _specs(loaded, next(seeds))
        for _ in run_specs(loaded, specs, prepare(loaded, specs), BATCH):
            pass

    def stored():
        sweep(loaded, _specs(loaded, next(seeds)), db, name="bench", batch_size=BATCH)

    times = rounds({"forward": forwards, "hooks": hooks_only, "sweep": stored}, repeats)
    specs = _specs(loaded, next(seeds))  # untimed: the rows the sweep's lens computes
    base = prepare(loaded, specs)
    measure = Measure(loaded, base)
    for batch in run_specs(loaded, specs, base, BATCH):
        measure.batch(batch)
    n_forwards = math.ceil(n_specs / BATCH) + 1
    figures = [
        judged("intervene: causal-trace sweep vs its bare forwards", median_ratio(times["forward"], times["sweep"]),
               "x", ">= 0.80", f"{n_specs} interventions (every boundary x position of {CLEAN!r}), batch {BATCH}: "
               f"{n_forwards} forwards; the sweep stores the ledger, the deltas and the effects (lens top-1 at the "
               f"last position per boundary); median {median(times['sweep']):.2f} s vs "
               f"{median(times['forward']):.2f} s"),
        judged("intervene: edits and reads through hooks vs bare forwards",
               median_ratio(times["forward"], times["hooks"]), "x", None,
               "the same sweep without storage or lens: hooks, residual reads, baselines"),
        judged("intervene: lens rows per intervention", measure.scanned / n_specs, "rows", None,
               f"last-position rows that go through the {loaded.anatomy.vocab_size:,}-token unembedding (of "
               f"{n_bounds} boundaries: rows equal to one measured before, the reference run's below an "
               f"intervention's first change and the last boundary, read off the model's logits, are not); each "
               f"costs {loaded.anatomy.vocab_size * loaded.anatomy.d_model / 1e6:.0f}M multiply-adds"),
    ]
    return figures + _storage(db, loaded)


def _storage(db: Path, loaded) -> list[Figure]:
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        n, rows, vecs = con.execute("SELECT count(DISTINCT intervention_id), count(*), count(vec) "
                                    "FROM intervention_states").fetchall()[0]
        states = con.execute("SELECT count(*) FROM states s JOIN interventions i ON i.prompt_id = s.prompt_id "
                             "WHERE i.id = (SELECT min(id) FROM interventions)").fetchall()[0][0]
    finally:
        con.close()
    d = loaded.anatomy.d_model
    per = (vecs * d * 4 + rows * 20) / max(n, 1)  # float32 vectors + the scalar columns (pos, layer, norm, ...)
    full = states * (d * 4 + 20)
    return [
        judged("intervene: storage per intervention", per / 1024, "KiB", None,
               f"the delta's vectors and scalars, mean over {n} interventions (float32; d = {d})"),
        judged("intervene: storage per intervention vs a full journey", per / full, "x", None,
               f"a full journey's {states} residual states at the same width"),
    ]

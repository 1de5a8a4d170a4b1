"""An intervention sweep on Ray: its batches spread over model actors, this process the one writer.

The driver (this process) has already stored the clean journeys, keyed the specs and skipped those in the ledger
(`geomap.ingest.interventions.sweep`). The specs still to run go to Ray Data as one block per batch, mapped onto a
fixed pool of `SweepWorker` actors; each loads the model once, keeps the clean runs it needs, runs a batch in one
forward pass and measures it (`geomap.intervene.measure`). The measured rows come back in order and the driver
writes each batch in its own transaction, as inline. A worker writes nothing, so a killed driver loses only the
batches it had not committed: the same command skips every spec in the ledger and runs the rest. A worker whose
process dies is Ray's to handle (``max_restarts``, ``max_task_retries``), as in ingestion.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterator, Sequence

import pyarrow as pa

from geomap.ingest.engine_config import EngineConfig
from geomap.ingest.ray_engine import plan_workers, quiet_data, require_ray, start_ray
from geomap.intervene.measure import Measured
from geomap.intervene.spec import Spec
from geomap.models.loading import LoadedModel


class SweepWorker:
    """A Ray Data actor holding one model replica; turns a block of pickled specs into one row of measured rows.

    Args:
        model: Preset, local directory or hub id (what the driver loaded).
        device: Torch device of this replica.
        dtype: Weights dtype name (None: the device's default).
        threads: Torch threads of a CPU replica.
        wanted: Target token ids of the effects (none: each prompt's clean top-1).
        batch_size: Prompts per forward pass of the clean runs (as the inline sweep).
    """

    def __init__(self, model: str, device: str, dtype: str | None, threads: int | None, wanted: list[int],
                 batch_size: int):
        from geomap.ingest.ray_worker import worker_model

        self.loaded = worker_model(model, device, dtype, threads)
        self.wanted, self.batch_size = wanted, batch_size
        self.base: dict = {}
        self.sites: set = set()
        self.measure = None

    def _baselines(self, specs: list[Spec]) -> None:
        """Keep the clean runs every spec so far needs (run again, with every site so far, when one is missing)."""
        from geomap.intervene.engine import baselines, needed_sites
        from geomap.intervene.measure import Measure

        sites = set(needed_sites(specs, self.loaded.anatomy.n_layers))
        texts = [t for s in specs for t in (s.prompt, s.source) if t is not None]
        if self.measure is not None and set(texts) <= set(self.base) and sites <= self.sites:
            return
        self.sites |= sites
        ordered = tuple(sorted(self.sites, key=lambda s: (s.kind, s.layer, s.head or 0)))
        self.base.update(baselines(self.loaded, list(dict.fromkeys([*self.base, *texts])), ordered,
                                   self.batch_size))
        self.measure = Measure(self.loaded, self.base, self.wanted)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Run and measure one batch of specs (one forward pass); one row: the pickled `Measured` list."""
        from geomap.intervene.engine import run_specs

        specs = [pickle.loads(blob) for blob in batch.column("spec").to_pylist()]
        self._baselines(specs)
        (outcomes,) = list(run_specs(self.loaded, specs, self.base, len(specs)))
        return pa.table({"measured": [pickle.dumps(self.measure.batch(outcomes))]})


def measure_ray(loaded: LoadedModel, specs: Sequence[Spec], wanted: Sequence[int], batch_size: int,
                engine: EngineConfig) -> Iterator[list[Measured]]:
    """The specs run ``batch_size`` per forward pass on Ray actors; each batch's measured rows, in order."""
    ray = require_ray()
    started = start_ray(ray, engine)
    try:
        plan = plan_workers(engine, ray.cluster_resources(), "cuda" if str(loaded.device).startswith("cuda")
                            else "cpu")
        quiet_data(ray)
        blobs = pa.table({"spec": pa.array([pickle.dumps(s) for s in specs], pa.binary())})
        blocks = [blobs.slice(i, batch_size) for i in range(0, blobs.num_rows, batch_size)]
        dtype = str(loaded.dtype).removeprefix("torch.")
        with warnings.catch_warnings():  # as in ingestion: no named parameter yet for an actor's restart budget
            warnings.simplefilter("ignore", DeprecationWarning)
            parts = ray.data.from_arrow(blocks).map_batches(
                SweepWorker, batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=True,
                fn_constructor_kwargs={"model": loaded.name, "device": plan.device, "dtype": dtype,
                                       "threads": plan.threads, "wanted": list(wanted),
                                       "batch_size": batch_size},
                compute=ray.data.ActorPoolStrategy(size=plan.workers), num_cpus=plan.num_cpus,
                num_gpus=plan.num_gpus or None, max_restarts=engine.max_restarts,
                max_task_retries=engine.max_task_retries)
        rows = iter(parts.iter_rows())
        try:
            for row in rows:
                yield pickle.loads(row["measured"])
        finally:  # on an error too: Ray Data stops the actors now, not when the iterator is collected
            rows.close()
    finally:
        if started:
            ray.shutdown()

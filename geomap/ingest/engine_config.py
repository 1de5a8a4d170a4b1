"""Which engine runs an ingestion: the pipeline's ``[engine]`` table, overridden by command-line flags.

`EngineConfig` is declared once, here: its annotations carry the constraints, and the pipeline file's validation
layer (`geomap.ingest.schema.PipelineSchema`) checks an ``[engine]`` table against them, as it checks every other
table; the command line's flags go through the same constraints (`EngineConfig.override`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Annotated, Literal

from annotated_types import Ge
from pydantic import ConfigDict, StrictInt, StrictStr, StringConstraints, TypeAdapter, ValidationError

from geomap.errors import GeomapError

Text = Annotated[StrictStr, StringConstraints(pattern=r"\S")]  # a string with something in it


@dataclass(frozen=True)
class EngineConfig:
    """How an ingestion is executed.

    Attributes:
        kind: ``"inline"`` (this process captures and stores) or ``"ray"`` (Ray workers capture, this process
            stores what they make).
        address: A running Ray cluster to join (``ray start --head`` prints it); None starts Ray locally with
            this machine's cores.
        workers: Model replicas (Ray actors); default one per GPU, else one per two CPU cores.
        threads: Torch threads per CPU worker (default: the cores divided among the workers).
        max_restarts: How often Ray restarts a worker whose process died.
        max_task_retries: How often Ray retries a batch whose worker died under it.
        shards: Folder where workers put the shards they make (it must be shared by every machine of the
            cluster); default ``<store>.shards`` beside the DuckDB file.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")  # unknown keys refused; each field strict by its type

    kind: Literal["inline", "ray"] = "inline"
    address: Text | None = None
    workers: Annotated[StrictInt, Ge(1)] | None = None
    threads: Annotated[StrictInt, Ge(1)] | None = None
    max_restarts: Annotated[StrictInt, Ge(0)] = 3
    max_task_retries: Annotated[StrictInt, Ge(0)] = 3
    shards: Text | None = None

    def override(self, kind: str | None = None, address: str | None = None,
                 workers: int | None = None) -> EngineConfig:
        """This configuration with the command line's flags (those given) taking precedence."""
        changes = {k: v for k, v in (("kind", kind), ("address", address), ("workers", workers)) if v is not None}
        engine = replace(self, **changes)
        try:
            TypeAdapter(EngineConfig).validate_python(asdict(engine))
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(part) for part in error["loc"])
            raise GeomapError(f"the command line: engine {key} = {error.get('input')!r} is not allowed: "
                              f"{error['msg']}") from None
        if engine.kind == "inline" and (address is not None or workers is not None):
            raise GeomapError("--address and --workers apply to the Ray engine: add --engine ray")
        return engine

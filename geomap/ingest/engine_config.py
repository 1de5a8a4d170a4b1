"""Which engine runs an ingestion: the pipeline's ``[engine]`` table, overridden by command-line flags."""

from __future__ import annotations

from dataclasses import dataclass, replace

from geomap.errors import GeomapError

ENGINES = ("inline", "ray")


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

    kind: str = "inline"
    address: str | None = None
    workers: int | None = None
    threads: int | None = None
    max_restarts: int = 3
    max_task_retries: int = 3
    shards: str | None = None

    def override(self, kind: str | None = None, address: str | None = None,
                 workers: int | None = None) -> EngineConfig:
        """This configuration with the command line's flags (those given) taking precedence."""
        changes = {k: v for k, v in (("kind", kind), ("address", address), ("workers", workers)) if v is not None}
        engine = check_engine(replace(self, **changes), "the command line")
        if engine.kind == "inline" and (address is not None or workers is not None):
            raise GeomapError("--address and --workers apply to the Ray engine: add --engine ray")
        return engine


def check_engine(engine: EngineConfig, where: str) -> EngineConfig:
    """Check an engine configuration's values; raises `GeomapError` naming ``where``."""
    if engine.kind not in ENGINES:
        raise GeomapError(f"{where}: engine kind must be one of {ENGINES}, not {engine.kind!r}")
    for name in ("workers", "threads"):
        value = getattr(engine, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise GeomapError(f"{where}: engine {name} must be a whole number of at least 1, not {value!r}")
    for name in ("max_restarts", "max_task_retries"):
        value = getattr(engine, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise GeomapError(f"{where}: engine {name} must be a whole number of at least 0, not {value!r}")
    for name in ("address", "shards"):
        value = getattr(engine, name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise GeomapError(f"{where}: engine {name} must be a non-empty string, not {value!r}")
    return engine


def parse_engine(table: object, where: str) -> EngineConfig:
    """The ``[engine]`` table of a pipeline file (absent: inline)."""
    if table is None:
        return EngineConfig()
    if not isinstance(table, dict):
        raise GeomapError(f"{where}: [engine] must be a table, like [engine] kind = \"ray\"")
    known = set(EngineConfig.__dataclass_fields__)
    if unknown := set(table) - known:
        raise GeomapError(f"{where}: unknown keys in [engine]: {sorted(unknown)}; allowed: {sorted(known)}")
    return check_engine(EngineConfig(**table), where)

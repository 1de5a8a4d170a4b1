"""``geomap serve``: run the HTTP server that owns a store."""

from __future__ import annotations

from pathlib import Path

import click

from geomap.cli.store_cmds import db_option, store_path
from geomap.store.sql_budget import DEFAULT_MEMORY_MB


@click.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Bind address; anything but loopback requires a bearer token.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token", envvar="GEOMAP_TOKEN", default=None,
              help="Bearer token required on every request but /healthz ($GEOMAP_TOKEN; generated when binding "
                   "beyond loopback without one).")
@click.option("--allow-host", "allow_hosts", multiple=True, help="Another name accepted in the Host header.")
@click.option("--model", "models", multiple=True,
              help="A model name or directory jobs may load (repeatable; default: the presets); the first is the "
                   "default model of jobs.")
@click.option("--pipelines", type=click.Path(file_okay=False, path_type=Path), default=Path("pipelines"),
              show_default=True, help="Folder of pipeline files that POST /runs may run by name.")
@click.option("--max-body", default=1_000_000, show_default=True, help="Largest request body, bytes.")
@click.option("--sql-time-limit", default=10.0, show_default=True, help="Most seconds a query may run.")
@click.option("--sql-max-rows", default=10_000, show_default=True, help="Most rows a query returns.")
@click.option("--sql-memory", "sql_memory", default=DEFAULT_MEMORY_MB, show_default=True,
              help="Memory budget of one SQL query, MB: past it the query is stopped and refused.")
@click.option("--ray", "ray_jobs", is_flag=True,
              help="Let jobs run on Ray (started on this machine; needs 'geomap[ray]'): `geomap run --engine ray` "
                   "on this store then goes through the server. Without it, Ray jobs are refused.")
@click.option("--access-log", is_flag=True,
              help="Write a line per request to stderr (off by default: under load the log costs about a tenth of "
                   "the server's time; startup, warnings and errors are always written).")
def serve(db: Path | None, host: str, port: int, token: str | None, allow_hosts: tuple[str, ...],
          models: tuple[str, ...], pipelines: Path, max_body: int, sql_time_limit: float, sql_max_rows: int,
          sql_memory: float, ray_jobs: bool, access_log: bool) -> None:
    """Serve the store over HTTP: runs, prompts, SQL, neighbours, ingestion jobs and reports (docs at /docs)."""
    from geomap.cli import quiet_transformers
    from geomap.serve.app import Settings
    from geomap.serve.runner import serve as run_server
    from geomap.store.sql_budget import check_limits

    check_limits(sql_time_limit, sql_max_rows, sql_memory)
    if ray_jobs:
        from geomap.ingest.ray_engine import require_ray

        require_ray()  # one clear line now, not a failed job later
    quiet_transformers()
    settings = Settings(store_path(db), token=token, allowed_hosts=allow_hosts, max_body=max_body,
                        sql_time_limit=sql_time_limit, sql_max_rows=sql_max_rows,
                        sql_memory_mb=sql_memory, models=models, pipelines=pipelines, ray_jobs=ray_jobs)
    run_server(settings, host, port, access_log=access_log)


COMMANDS = [serve]

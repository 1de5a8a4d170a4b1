"""``geomap export``: a table or a read-only query of the store, streamed to Parquet, CSV, Arrow or npy."""

from __future__ import annotations

import json
from pathlib import Path

import click

from geomap.cli.store_cmds import db_option, existing_store
from geomap.store.sql_budget import DEFAULT_MEMORY_MB


@click.command()
@click.argument("query_or_table")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="File to write (replaced once the export succeeds).")
@click.option("--format", "fmt", default=None, type=click.Choice(["parquet", "csv", "arrow", "npy"]),
              help="Default: from --out's suffix (.parquet, .csv, .arrow, .npy).")
@db_option
@click.option("--time-limit", default=600.0, show_default=True, help="Seconds before the export is interrupted.")
@click.option("--memory", "memory_mb", default=DEFAULT_MEMORY_MB, show_default=True,
              help="Memory budget, MB (the rows stream through in batches; this bounds DuckDB and the process).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(query_or_table: str, out: Path, fmt: str | None, db: Path | None, time_limit: float, memory_mb: float,
           as_json: bool, quiet: bool) -> None:
    """Write a table (``states``) or a read-only query of the store to a file, with no row cap.

    Vectors keep their stored float32. The query is checked as `geomap sql` checks it (read-only, no files).
    """
    from tqdm import tqdm

    from geomap.cli.remote import refuse_if_served
    from geomap.store.export import export as run_export
    from geomap.store.export import format_for

    fmt = format_for(out, fmt)
    path = existing_store(db)
    refuse_if_served(path, "export")
    bars: list = []  # made at the first batch, so a refused export prints its one error line only

    def on_rows(n: int) -> None:
        if not bars:
            bars.append(tqdm(unit="row", unit_scale=True, desc=f"export {out.name}", disable=quiet or as_json,
                             dynamic_ncols=True, leave=False))
        bars[0].update(n)

    try:
        done = run_export(path, query_or_table, out, fmt, time_limit=time_limit, memory_mb=memory_mb,
                          on_rows=on_rows)
    finally:
        for bar in bars:
            bar.close()
    if as_json:
        click.echo(json.dumps({"path": str(done.path), "format": done.format, "rows": done.rows, "bytes": done.bytes,
                               "seconds": round(done.seconds, 3)}))
    else:
        click.echo(f"exported {done.rows} rows to {done.path} ({done.format}, {done.bytes / 2**20:.1f} MB) in "
                   f"{done.seconds:.1f}s", err=True)


COMMANDS = (export,)

"""Query commands: sql and neighbors, read-only questions to a store, answered locally or by its running server."""

from __future__ import annotations

import json
from pathlib import Path

import click

from geomap.cli.prompt_ids import prompt_option
from geomap.cli.store_cmds import db_option, existing_store, store_path
from geomap.store.sql_budget import DEFAULT_MEMORY_MB


@click.command()
@click.argument("query")
@db_option
@click.option("--format", "fmt", default="table", type=click.Choice(["table", "csv", "json"]), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--time-limit", default=5.0, show_default=True, help="Seconds before the query is interrupted.")
@click.option("--max-rows", default=10_000, show_default=True, help="Row cap.")
@click.option("--memory", "memory_mb", default=DEFAULT_MEMORY_MB, show_default=True,
              help="Memory budget, MB: past it the query is stopped and refused (a server applies its own).")
def sql(query: str, db: Path | None, fmt: str, as_json: bool, time_limit: float, max_rows: int,
        memory_mb: float) -> None:
    """Run a read-only SQL query against the store."""
    from geomap.cli.remote import server_for
    from geomap.store.sql import run_sql
    from geomap.store.sql_budget import check_limits
    from geomap.store.sql_result import SqlResult

    check_limits(time_limit, max_rows, memory_mb)
    fmt = "json" if as_json else fmt
    if (client := server_for(store_path(db))) is not None:
        got = client.request("POST", "/sql", {"sql": query, "time_limit": time_limit, "max_rows": max_rows})
        result = SqlResult(got["columns"], [tuple(r) for r in got["rows"]], got["truncated"], got["elapsed_s"])
    else:
        result = run_sql(store_path(db), query, time_limit=time_limit, max_rows=max_rows, memory_mb=memory_mb)
    click.echo(result.format(fmt))
    if result.truncated and fmt != "table":  # the table's own footer already says so
        click.echo(f"(truncated: showing the first {max_rows} rows; raise --max-rows to see more)", err=True)


@click.command()
@db_option
@prompt_option()
@click.option("--layer", type=int, required=True, help="Residual boundary 0..L.")
@click.option("--pos", type=int, default=None, help="Position (default: the prompt's last).")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(min=1),
              help="Neighbours to return (at most the layer's stored states).")
@click.option("--last", "last_only", is_flag=True, help="Only each prompt's last position: the nearest prompts.")
@click.option("--json", "as_json", is_flag=True)
def neighbors(db: Path | None, prompt_id: int, layer: int, pos: int | None, k: int, last_only: bool,
              as_json: bool) -> None:
    """The stored states nearest to one state (cosine of per-layer standardised residuals)."""
    import pandas as pd

    from geomap.cli.remote import server_for
    from geomap.store.query import neighbors as find

    if (client := server_for(store_path(db))) is not None:
        query = f"prompt_id={prompt_id}&layer={layer}&k={k}&last={str(last_only).lower()}"
        got = client.request("GET", "/neighbors?" + query + ("" if pos is None else f"&pos={pos}"))
        frame = pd.DataFrame(got["neighbors"])
    else:
        frame = find(existing_store(db), prompt_id, layer, pos, k, last_only=last_only)
    if as_json:
        cols = ["prompt_id", "pos", "layer", "token", "prompt_text", "similarity"]
        click.echo(json.dumps(json.loads(frame[cols].to_json(orient="records")), ensure_ascii=False))
    else:
        from geomap.store.sql_result import SqlResult

        shown = frame.drop(columns=["state_id"]).astype(object).where(frame.drop(columns=["state_id"]).notna(), None)
        shown["similarity"] = [round(float(v), 4) for v in frame["similarity"]]
        click.echo(SqlResult(list(shown.columns), [tuple(r) for r in shown.itertuples(index=False)], False, 0.0)
                   .format("table"))


COMMANDS = (sql, neighbors)

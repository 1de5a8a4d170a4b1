"""Text the user guide quotes from the code itself, generated with cog (``cog -r -P -I . docs/cli.md docs/sql.md``).

`tests/test_docs_site.py` runs ``cog --check``: a help text or refusal message that changes without the guide
being regenerated fails the suite.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

REFUSED = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "COPY states TO 'states.csv'",
    "DELETE FROM prompts",
    "SET memory_limit = '64GB'",
    "SELECT 1; SELECT 2",
    "SELECT len(range(1e10))",
]


def refusals() -> None:
    """Print each refused statement as `geomap sql` shows it: the command, then its one error line."""
    from geomap.store.db import connect, ensure_schema
    from geomap.store.sql import SqlError, run_sql

    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "s.duckdb"
        con = connect(db)
        ensure_schema(con, 8)
        con.close()
        print("```")
        for sql in REFUSED:
            try:
                run_sql(db, sql)
                message = "(not refused)"
            except SqlError as exc:
                message = " ".join(str(exc).split())
            print(f'$ geomap sql "{sql}"\nerror: {message}')
        print("```")


def cli_reference() -> None:
    """Print every command's ``--help``, as the terminal shows it at 100 columns."""
    import click

    from geomap.cli import cli

    def walk(command: click.Command, path: list[str]):
        yield path, command
        if isinstance(command, click.Group):
            for name in sorted(command.commands):
                yield from walk(command.commands[name], [*path, name])

    for path, command in walk(cli, ["geomap"]):
        if command.hidden:
            continue
        ctx = click.Context(command, info_name=" ".join(path), terminal_width=100, max_content_width=100)
        print(f"## `{' '.join(path)}`\n\n```text\n{command.get_help(ctx)}\n```\n")

"""``geomap store``: upkeep of a store's vector segments (compact, migrate)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import click

from geomap.cli.store_cmds import db_option, existing_store


@click.group()
def store() -> None:
    """Upkeep of the store's files: vector segments."""


@contextlib.contextmanager
def _disk_refusals(db: Path) -> Iterator[None]:
    """A write the disk refused (full, read-only) as one `StorageError`, naming the store where the error names no file.

    A segment's write that the disk refuses half-way names no file (``OSError: [Errno 28]``).
    """
    from geomap.store.db import storage_error

    try:
        yield
    except OSError as exc:
        error = storage_error(exc, db)
        if error is None:
            raise
        raise error from None


@store.command("compact")
@db_option
def compact(db: Path | None) -> None:
    """Merge small vector segments into large ones (idempotent; a killed compaction is finished by a rerun).

    Segments an older geomap wrote with pyarrow's uncompressed fallback are written again by geomap's own writer.
    """
    from geomap.store.compaction import compact as compact_segments
    from geomap.store.compaction import rewrite_foreign
    from geomap.store.db import ensure_schema
    from geomap.store.handle import Store
    from geomap.store.segments import layout, open_for_writing

    path = existing_store(db)
    with _disk_refusals(path), Store.open(path, "w") as store, store.writer() as con:  # it holds the store alone
        ensure_schema(con)
        if layout(con) != "segments":
            click.echo("this store keeps its vectors in DuckDB rows; `geomap store migrate` moves them to segments")
            return
        open_for_writing(con)
        replaced = compact_segments(con)
        rewritten = sum(rewrite_foreign(con).values())
        left = con.execute("SELECT count(*) FROM internal.segments").fetchall()[0][0]
    again = f"; rewrote {rewritten} written by an older geomap" if rewritten else ""
    click.echo(f"compacted {sum(replaced.values())} segments{again}; {left} segments now")


@store.command("migrate")
@db_option
def migrate(db: Path | None) -> None:
    """Move the store's vectors from DuckDB rows into segment files, losing nothing (a rerun carries on)."""
    from geomap.store.db import ensure_schema
    from geomap.store.handle import Store
    from geomap.store.segment_migrate import migrate as migrate_segments
    from geomap.store.segments import open_for_writing

    path = existing_store(db)
    with _disk_refusals(path), Store.open(path, "w") as store, store.writer() as con:
        ensure_schema(con)
        open_for_writing(con)
        moved = migrate_segments(con)
    click.echo(f"moved {sum(moved.values())} vector rows into segments")


COMMANDS = (store,)

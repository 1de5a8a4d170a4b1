"""`Store`: one open store, the handle every stage reads and writes through (in the spirit of datasette's `Database`).

A `Store` owns one DuckDB instance of the store's file and the folder of its FAISS indexes beside it. Whoever opens
it closes it: the CLI opens one per command, ``geomap serve`` one for its whole life, and every thread of the server
takes cursors from that one instance. Work goes through three doors:

- `Store.snapshot` — a cursor inside a READ ONLY transaction: one consistent snapshot, which DuckDB itself keeps from
  writing (a page, a JSON answer, user SQL);
- `Store.transaction` — a cursor inside a read-write transaction, committed when the block ends and rolled back
  when it raises;
- `Store.writer` — a read-write cursor in auto-commit mode, for long work that commits in steps of its own (an
  ingestion commits one transaction per batch, a schema upgrade its DDL).

`Store.query` runs one reading statement in a snapshot and returns `Results`, rows that carry their columns.

The stages' functions take a `Store`; for notebooks and tests they also take a path, and then open a store for the
call (`Store.use`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import duckdb

from geomap.store.db import StoreError, connect, in_transaction, index_dir, writer_settings

Mode = Literal["r", "w"]


@dataclass(frozen=True)
class Results:
    """Rows of one query with their column names.

    Attributes:
        columns: The column names, in order.
        rows: The rows as tuples, in the query's order.
    """

    columns: tuple[str, ...]
    rows: list[tuple]

    def dicts(self) -> list[dict[str, Any]]:
        """The rows as ``{column: value}`` mappings."""
        return [dict(zip(self.columns, row)) for row in self.rows]

    def first(self) -> tuple | None:
        """The first row, or None when there is none."""
        return self.rows[0] if self.rows else None

    def scalar(self) -> Any:
        """The first column of the first row (None when there is no row)."""
        return self.rows[0][0] if self.rows else None

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.rows)


class Store:
    """An open store: its DuckDB instance (opened read-only or read-write) and its index folder.

    Open with `Store.open`; use as a context manager or call `close`. Cursors come from `snapshot`, `transaction`
    and `writer`, each closed when its block ends; any number may be open at once, from any thread.

    Attributes:
        path: The DuckDB file.
        mode: ``"r"`` (read-only instance) or ``"w"`` (read-write).
        locked: Whether the instance runs under a locked configuration (``geomap serve``'s lockdown, user SQL): its
            settings were fixed when it opened and cannot change.
    """

    def __init__(self, path: Path, con: duckdb.DuckDBPyConnection, mode: Mode, locked: bool):
        self.path, self.mode, self.locked = path, mode, locked
        self._con: duckdb.DuckDBPyConnection | None = con

    @classmethod
    def open(cls, path: str | Path, mode: Mode = "r", config: Mapping[str, Any] | None = None,
             create: bool = True) -> Store:
        """Open the store at ``path``.

        Args:
            path: The DuckDB file; in mode ``"w"`` it (and its folder) is created if missing, unless ``create`` is
                false.
            mode: ``"r"`` for a read-only instance, ``"w"`` for a read-write one.
            config: DuckDB configuration of the instance (``geomap serve`` passes its lockdown).
            create: In mode ``"w"``, create a missing store (else a missing one is an error, as in mode ``"r"``).

        Raises:
            StoreError: No store at ``path`` (mode ``"r"``, or ``create`` false), or it cannot be opened;
                `StoreLockedError` while another process writes to it.
        """
        if mode not in ("r", "w"):
            raise ValueError(f"mode must be 'r' or 'w', not {mode!r}")
        path = Path(path)
        if mode == "w" and not create and not path.exists():
            connect(path, read_only=True)  # raises the "No store at" error
        con = connect(path, read_only=mode == "r", config=dict(config or {}))
        return cls(path, con, mode, bool((config or {}).get("lock_configuration")))

    @classmethod
    @contextmanager
    def use(cls, store: StoreLike, mode: Mode = "r", create: bool = True) -> Iterator[Store]:
        """The given `Store` as it is, or a store opened at the given path for the block (and closed after it)."""
        if isinstance(store, Store):
            yield store
            return
        opened = cls.open(store, mode, create=create)
        try:
            yield opened
        finally:
            opened.close()

    @property
    def index_dir(self) -> Path:
        """The folder of the store's FAISS indexes, ``<db stem>.indexes`` beside the DuckDB file."""
        return index_dir(self.path)

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A bare cursor of the instance, in auto-commit mode, that the caller closes.

        For a watchdog's probe or a reader that runs its own transaction; prefer `snapshot`, `transaction`, `writer`.
        """
        if self._con is None:
            raise StoreError(f"The store {self.path} is closed.")
        return self._con.cursor()

    def _writable(self) -> None:
        if self.mode != "w":
            raise StoreError(f"The store {self.path} is open read-only here; this needs it opened for writing.")

    @contextmanager
    def snapshot(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor inside a READ ONLY transaction: one consistent snapshot, where any write is refused."""
        cur = self.cursor()
        try:
            cur.execute("BEGIN TRANSACTION READ ONLY")
            yield cur
        finally:
            cur.close()  # closing ends the transaction; a read-only one has nothing to keep

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor inside a read-write transaction, committed at the end of the block and rolled back on error."""
        self._writable()
        cur = self.cursor()
        try:
            with in_transaction(cur):
                yield cur
        finally:
            cur.close()

    @contextmanager
    def writer(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write cursor in auto-commit mode, for work that runs its own transactions (closed at the end)."""
        self._writable()
        cur = self.cursor()
        try:
            yield cur
        finally:
            cur.close()

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> Results:
        """Run one reading statement in its own snapshot."""
        with self.snapshot() as cur:
            cur.execute(sql, params)
            columns = tuple(d[0] for d in cur.description or ())
            return Results(columns, [tuple(r) for r in cur.fetchall()] if columns else [])

    def prepare_writer(self) -> None:
        """Set the instance up for ingestion (deferred checkpoints, memory cap; `geomap.store.db.writer_settings`).

        A locked instance (``geomap serve``) was given both when it opened, so nothing changes there.
        """
        self._writable()
        if not self.locked:
            with self.writer() as cur:
                writer_settings(cur)

    def close(self) -> None:
        """Close the instance (and every cursor still open on it); closing twice does nothing."""
        con, self._con = self._con, None
        if con is not None:
            con.close()

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        return self._con is None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({os.fspath(self.path)!r}, mode={self.mode!r}{', locked' if self.locked else ''})"


StoreLike = Store | str | Path  # what the stages' functions take: an open store, or a path to open one at

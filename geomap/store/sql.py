"""User SQL against a store: one read-only query in a locked-down connection, with a time limit and a row cap."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from geomap.errors import GeomapError
from geomap.store.db import connect

FORMATS = ("table", "csv", "json")
_READ_TYPES = {"SELECT", "EXPLAIN", "PRAGMA", "CALL", "MULTI"}  # MULTI: PIVOT; DuckDB still enforces read-only
_WHAT = {"SET": "changes a setting", "LOAD": "installs or loads an extension", "ATTACH": "attaches a database",
         "DETACH": "detaches a database", "COPY": "copies data to or from files", "EXPORT": "exports to files",
         "TRANSACTION": "controls transactions"}  # anything else not in _READ_TYPES: "writes to the store"
_CELL_WIDTH = 80


class SqlError(GeomapError):
    """The SQL could not run: a syntax error, an unknown table or column, a type error."""


class SqlRefused(SqlError):
    """The SQL tried something that store SQL may not do (write, reach files, change settings, ...)."""


class SqlTimeout(SqlRefused):
    """The SQL ran past its time limit and was interrupted."""


def sql_connection_config() -> dict[str, Any]:
    """DuckDB configuration for untrusted read-only SQL: no files, network, extensions or Python variables.

    Returns:
        A config mapping for ``duckdb.connect(path, read_only=True, config=...)``; the configuration is locked, so
        ``SET``/``RESET``/``PRAGMA`` cannot loosen it afterwards.
    """
    return {
        "enable_external_access": False,  # files (read_csv, COPY, ATTACH, glob), network, INSTALL/LOAD of files
        "python_enable_replacements": False,  # no scanning of Python variables by name (SELECT * FROM some_df)
        "autoload_known_extensions": False,
        "autoinstall_known_extensions": False,
        "allow_community_extensions": False,
        "allow_unsigned_extensions": False,
        "lock_configuration": True,  # SET/RESET/PRAGMA cannot loosen any of the above
    }


@dataclass(frozen=True)
class SqlResult:
    """Result of `run_sql`: column names, at most ``max_rows`` rows, whether more were cut, and the run time."""

    columns: list[str]
    rows: list[tuple]
    truncated: bool
    elapsed_s: float

    def to_pandas(self) -> Any:
        """The rows as a pandas DataFrame (duplicate column names are kept)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.rows, columns=self.columns)

    def to_arrow(self) -> Any:
        """The rows as a pyarrow Table; a column Arrow cannot type is given as strings."""
        import pyarrow as pa

        arrays = []
        for i in range(len(self.columns)):
            values = [row[i] for row in self.rows]
            try:
                arrays.append(pa.array(values))
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                arrays.append(pa.array([None if v is None else _text(v) for v in values], pa.string()))
        return pa.Table.from_arrays(arrays, names=list(self.columns))

    def to_records(self) -> list[dict[str, Any]]:
        """The rows as JSON-ready dicts (bytes as UTF-8 text or ``0x`` hex, NaN as None, dates as ISO text)."""
        return [{c: _json_value(v) for c, v in zip(self.columns, row)} for row in self.rows]

    def format(self, fmt: str = "table") -> str:
        """Render the result as ``table`` (aligned plain text), ``csv`` or ``json`` (an array of row objects).

        Raises:
            ValueError: ``fmt`` is not one of `FORMATS`.
        """
        if fmt == "json":
            return json.dumps(self.to_records(), ensure_ascii=False)
        if fmt == "csv":
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(self.columns)
            writer.writerows([_text(v) for v in row] for row in self.rows)
            return out.getvalue()
        if fmt == "table":
            return self._table()
        raise ValueError(f"Unknown format {fmt!r}; use one of {', '.join(FORMATS)}.")

    def _table(self) -> str:
        cells = [[_cell(v) for v in row] for row in self.rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
        right = [all(isinstance(r[i], (int, float, Decimal)) or r[i] is None for r in self.rows) for i in
                 range(len(self.columns))]  # numbers right-aligned

        def line(values: Sequence[str]) -> str:
            return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

        lines = [line(self.columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
        more = ", truncated: more rows matched" if self.truncated else ""
        lines.append(f"({len(self.rows)} row{'' if len(self.rows) == 1 else 's'}{more})")
        return "\n".join(lines)


def _json_value(v: Any) -> Any:
    """A JSON-safe version of a value fetched from DuckDB."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Decimal):
        return int(v) if v.is_finite() and v == v.to_integral_value() else _json_value(float(v))
    if isinstance(v, (bytes, bytearray, memoryview)):
        raw = bytes(v)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "0x" + raw.hex()
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, (dt.timedelta, uuid.UUID)):
        return str(v)
    if isinstance(v, Mapping):
        return {str(_json_value(k)): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_json_value(x) for x in v]
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return _json_value(v.tolist())
    return str(v)


def _text(v: Any) -> str:
    """A value as one line of text for CSV: NULL as empty, nested values as JSON."""
    v = _json_value(v)
    if v is None:
        return ""
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)


def _cell(v: Any) -> str:
    """A value for the plain-text table: one line, at most ``_CELL_WIDTH`` characters."""
    if isinstance(v, float) and math.isfinite(v) and float(np.float32(v)) == v:
        v = float(str(np.float32(v)))  # a FLOAT column's value, shown by its shortest float32 digits
    text = "NULL" if v is None else _text(v).replace("\n", "\\n")
    return text if len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 1] + "…"


def _open(db_path: str | Path) -> duckdb.DuckDBPyConnection:
    """A fresh read-only connection to the store under `sql_connection_config`."""
    return connect(db_path, read_only=True, config=sql_connection_config())


def _check(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse anything but exactly one read statement, using DuckDB's own parser."""
    statements = con.extract_statements(sql)
    if not statements:
        raise SqlError("No SQL statement given.")
    if len(statements) > 1:
        raise SqlRefused(f"Refused: {len(statements)} statements given; run one statement at a time.")
    kind = statements[0].type.name
    if kind not in _READ_TYPES:
        keyword = (statements[0].query.split() or [kind])[0].upper()
        raise SqlRefused(f"Refused {keyword} (a {kind} statement): it {_WHAT.get(kind, 'writes to the store')}. "
                         "Store SQL is read-only: one SELECT/WITH/FROM/DESCRIBE/SHOW/SUMMARIZE/EXPLAIN query.")


def _error(exc: duckdb.Error) -> SqlError:
    """Map a DuckDB error to a `SqlRefused` naming what was refused, else a `SqlError` with DuckDB's message."""
    msg = str(exc).strip()
    if isinstance(exc, duckdb.PermissionException):
        return SqlRefused(f"Refused: the query reaches outside the store (files, network or extensions); only the "
                          f"store's tables can be read. DuckDB said: {msg}")
    if "read-only mode" in msg:
        return SqlRefused(f"Refused: the query writes to the store, which store SQL can only read. DuckDB said: {msg}")
    if "configuration has been locked" in msg:
        return SqlRefused(f"Refused: the query changes a setting; settings are locked. DuckDB said: {msg}")
    return SqlError(f"SQL error: {msg}")


def run_sql(
    db_path: str | Path,
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None = None,
    time_limit: float = 5.0,
    max_rows: int = 10_000,
) -> SqlResult:
    """Run one read-only SQL statement against a store, datasette-style.

    Args:
        db_path: The store's DuckDB file.
        sql: One statement: SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, PIVOT, EXPLAIN, or a reading PRAGMA/CALL.
        params: Values for ``?`` (a sequence) or ``$name`` (a mapping) placeholders.
        time_limit: Seconds before the query is interrupted.
        max_rows: Most rows returned; ``truncated`` says whether more matched.

    Returns:
        The columns, up to ``max_rows`` rows, whether rows were cut, and the elapsed seconds.

    Raises:
        SqlRefused: The SQL writes, reaches files/extensions/network, changes settings, or holds several statements.
        SqlTimeout: It ran past ``time_limit``.
        SqlError: DuckDB rejected it (syntax, unknown table or column, ...).
        StoreError: There is no store at ``db_path`` (`StoreLockedError` while another process writes to it).
    """
    if time_limit <= 0 or max_rows < 1:
        raise ValueError("time_limit must be positive and max_rows at least 1.")
    con = _open(db_path)
    timed_out = threading.Event()

    def interrupt() -> None:
        timed_out.set()
        con.interrupt()  # the connection is still open: it is closed only after the timer is joined

    timer = threading.Timer(time_limit, interrupt)
    timer.daemon = True
    start = time.perf_counter()
    try:
        _check(con, sql)
        timer.start()
        con.execute(sql, params)
        columns = [d[0] for d in con.description or []]
        rows = [tuple(r) for r in con.fetchmany(max_rows + 1)] if columns else []
    except duckdb.Error as exc:
        if timed_out.is_set():
            raise SqlTimeout(f"Refused: the query ran past its time limit of {time_limit:g} s and was stopped; "
                             "narrow it (WHERE, LIMIT) or raise the limit.") from None
        raise _error(exc) from None
    finally:
        timer.cancel()
        if timer.is_alive():
            timer.join()
        con.close()
    return SqlResult(columns, rows[:max_rows], len(rows) > max_rows, time.perf_counter() - start)

"""The answer to a user query: its columns and rows, as Arrow until asked for as Python values, and its renderings.

`SqlResult` turns the rows into Python values, numpy, pandas, Arrow, JSON-ready records, or plain text (``table``,
``csv``, ``json``); `json_value` is the one JSON-safe form of a DuckDB value that the server and the CLI share.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import numpy as np

FORMATS = ("table", "csv", "json")
_CELL_WIDTH = 80


class SqlResult:
    """Result of `run_sql`: column names, at most ``max_rows`` rows, whether more were cut, and the run time.

    A result fetched from the store keeps its rows as Arrow (``table``) until they are asked for as Python values
    (``rows``, `to_records`, `format`), so a query's memory budget is spent on the data (a ``FLOAT[640]`` vector
    takes 2.5 kB, not the 20 kB of a list of Python floats) and vectors keep their stored float32.

    Args:
        columns: Column names (duplicates are kept).
        rows: The rows as tuples; None when ``table`` holds them.
        truncated: Whether more rows matched than were kept.
        elapsed_s: Seconds the query took.
        table: The rows as a pyarrow Table, when they came from the store.
    """

    def __init__(self, columns: list[str], rows: list[tuple] | None = None, truncated: bool = False,
                 elapsed_s: float = 0.0, table: Any = None):
        self.columns, self.truncated, self.elapsed_s, self.table = list(columns), truncated, elapsed_s, table
        self._rows = rows

    @property
    def rows(self) -> list[tuple]:
        """The rows as tuples of Python values (built from ``table`` on first use)."""
        if self._rows is None:
            from geomap.store.columns import py_values

            if self.table is None or not self.columns:
                self._rows = []
            else:
                self._rows = list(zip(*(py_values(c) for c in self.table.columns)))
        return self._rows

    def __len__(self) -> int:
        return self.table.num_rows if self._rows is None and self.table is not None else len(self.rows)

    def to_numpy(self, column: str | None = None) -> Any:
        """Columns as numpy arrays: a ``FLOAT[d]`` vector column as one ``(rows, d)`` float32 array.

        Args:
            column: One column's name; None for all of them.

        Returns:
            The named column's array, or ``{name: array}`` for every column (see `geomap.store.columns.to_numpy`).
        """
        from geomap.store.columns import to_numpy

        table = self.to_arrow()
        if column is not None:
            return to_numpy(table.column(self.columns.index(column)))
        return {name: to_numpy(table.column(i)) for i, name in enumerate(self.columns)}

    def to_pandas(self) -> Any:
        """The rows as a pandas DataFrame (duplicate column names are kept)."""
        import pandas as pd

        if self.table is not None and len(set(self.columns)) == len(self.columns):
            return self.table.to_pandas()
        return pd.DataFrame.from_records(self.rows, columns=self.columns)

    def to_arrow(self) -> Any:
        """The rows as a pyarrow Table (vectors keep their stored type).

        A column Arrow cannot type is given as strings.
        """
        import pyarrow as pa

        if self.table is not None:
            return self.table
        arrays = []
        for i in range(len(self.columns)):
            values = [row[i] for row in self.rows]
            try:
                arrays.append(pa.array(values))
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                arrays.append(pa.array([None if v is None else _text(v) for v in values], pa.string()))
        return pa.Table.from_arrays(arrays, names=list(self.columns))

    def json_rows(self) -> list[list[Any]]:
        """The rows as JSON-ready lists: `json_value` of every value, taken column by column.

        Columns whose Arrow type already gives JSON values (integers, text, booleans, and floats or lists of floats
        with no NaN or infinity) skip the per-value walk, which is most of a trajectory's encoding time.
        """
        if self.table is None or not self.columns:
            return [[json_value(v) for v in r] for r in self.rows]
        columns = [_json_column(c) for c in self.table.columns]
        return [list(r) for r in zip(*columns)]

    def to_records(self) -> list[dict[str, Any]]:
        """The rows as JSON-ready dicts (bytes as UTF-8 text or ``0x`` hex, NaN as None, dates as ISO text)."""
        return [{c: json_value(v) for c, v in zip(self.columns, row)} for row in self.rows]

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


def _json_column(column: Any) -> list[Any]:
    """One Arrow column as JSON-ready values (`json_value`), in bulk where its type allows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from geomap.store.columns import py_values

    kind, leaf = column.type, column
    while pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        leaf = pc.list_flatten(leaf)
        kind = kind.value_type
    plain = (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)
             or pa.types.is_boolean(kind) or pa.types.is_null(kind))
    if pa.types.is_floating(kind) and not pa.types.is_float16(kind):
        plain = len(leaf) == 0 or not pc.any(pc.invert(pc.is_finite(leaf))).as_py()
    values = py_values(column)
    return values if plain and not pa.types.is_map(column.type) else [json_value(v) for v in values]


def json_value(v: Any) -> Any:
    """A JSON-safe version of a value fetched from DuckDB."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Decimal):
        return int(v) if v.is_finite() and v == v.to_integral_value() else json_value(float(v))
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
        return {str(json_value(k)): json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [json_value(x) for x in v]
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return json_value(v.tolist())
    return str(v)


def _text(v: Any) -> str:
    """A value as one line of text for CSV: NULL as empty, nested values as JSON."""
    v = json_value(v)
    if v is None:
        return ""
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)


def _cell(v: Any) -> str:
    """A value for the plain-text table: one line, at most ``_CELL_WIDTH`` characters."""
    if isinstance(v, float) and math.isfinite(v) and float(np.float32(v)) == v:
        v = float(str(np.float32(v)))  # a FLOAT column's value, shown by its shortest float32 digits
    if isinstance(v, str) and v and v.isspace():  # a whitespace token would print as a blank cell: quote it
        return repr(v)
    text = "NULL" if v is None else _text(v).replace("\n", "\\n")
    return text if len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 1] + "…"

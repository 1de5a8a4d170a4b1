"""Arrow columns fetched from the store, as numpy arrays (vectors stay float32) or as plain Python values."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pyarrow as pa


def is_vector(kind: pa.DataType) -> bool:
    """Whether an Arrow type is a list of numbers (a stored vector such as ``states.vec`` or ``lens.probs``)."""
    if not (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        return False
    value = kind.value_type
    return pa.types.is_floating(value) or pa.types.is_integer(value)


def to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """One column as a numpy array, with no copy through Python objects where the type allows.

    A fixed-size list of numbers (``FLOAT[d]``: ``states.vec``, ``contributions.attn``, ...) becomes a 2-D array
    ``(rows, d)`` of its stored dtype (float32 stays float32); a list of varying length becomes a 1-D object array
    of 1-D arrays; a scalar column becomes a 1-D array (strings and other types as objects). NULL vectors become
    rows of NaN.
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = array.type
    if pa.types.is_fixed_size_list(kind) and is_vector(kind):
        width = kind.list_size
        dtype = kind.value_type.to_pandas_dtype()
        if array.null_count:
            dtype = np.result_type(dtype, np.float32)
            out = np.full((len(array), width), np.nan, dtype=dtype)
            valid = array.is_valid().to_numpy(zero_copy_only=False)
            out[valid] = _flat(array.filter(array.is_valid()), width, dtype)
            return out
        return _flat(array, width, dtype)
    if is_vector(kind):
        dtype = kind.value_type.to_pandas_dtype()
        out = np.empty(len(array), dtype=object)
        for i, value in enumerate(array):
            out[i] = None if not value.is_valid else value.values.to_numpy(zero_copy_only=False).astype(dtype)
        return out
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return array.to_numpy(zero_copy_only=False)
    return np.array(py_values(array), dtype=object)


def _flat(array: pa.FixedSizeListArray, width: int, dtype) -> np.ndarray:
    values = array.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return values.reshape(len(array), width)


def py_values(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    """One column as Python values, as DuckDB's ``fetchall`` gives them.

    A MAP becomes a dict, and an INTERVAL a timedelta when it holds no months.
    """
    values = column.to_pylist()
    kind = column.type
    if pa.types.is_map(kind):
        return [None if v is None else dict(v) for v in values]
    if kind == pa.month_day_nano_interval():
        return [_interval(v) for v in values]
    return values


def _interval(v: Any) -> Any:
    if v is None or v.months:
        return None if v is None else f"{v.months} months {v.days} days {v.nanoseconds / 1e9:g} s"
    return dt.timedelta(days=v.days, microseconds=v.nanoseconds / 1000)

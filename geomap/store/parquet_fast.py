"""A Parquet writer for segment tables that copies float vectors as they are, instead of encoding them value by value.

pyarrow's Parquet writer computes a repetition and a definition level for every float of a list column, one at a
time: ``FLOAT[640]`` lists encode at about 200 MB/s on one core, where the same bytes as a fixed-size binary column
go out at over 1.5 GB/s. For vectors those levels are always the same pattern (a new row, then ``d - 1``
continuations, all defined), so this writer builds them once per page with numpy, as run-length runs, and writes
the values as one PLAIN copy of the flat float buffer. The file is an ordinary Parquet file (format 1, data pages
v1, uncompressed, row-group statistics on the columns asked for) that DuckDB's built-in reader and pyarrow read.

It handles what segment tables hold: integer and float columns (nulls allowed), fixed-size and variable-size lists of
numbers without null elements (null rows allowed), and columns that are entirely null. Anything else returns None,
and the caller writes the table with pyarrow.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

MAGIC = b"PAR1"
# Parquet physical types, converted types, encodings and repetitions (parquet.thrift)
INT32, INT64, FLOAT, DOUBLE, BYTE_ARRAY = 1, 2, 4, 5, 6
CONVERTED_LIST, CONVERTED_INT_16 = 3, 16
PLAIN, RLE, BYTE_STREAM_SPLIT = 0, 3, 9
UNCOMPRESSED, ZSTD = 0, 6
ZSTD_LEVEL = 1  # the fastest level: float bytes split into streams compress about as well at 1 as at 3
REQUIRED, OPTIONAL, REPEATED = 0, 1, 2
# thrift compact protocol type ids
T_TRUE, T_I32, T_I64, T_BINARY, T_LIST, T_STRUCT = 1, 5, 6, 8, 9, 12

_NUMBERS = {pa.int16(): (INT32, np.int32, CONVERTED_INT_16), pa.int32(): (INT32, np.int32, None),
            pa.int64(): (INT64, np.int64, None), pa.float32(): (FLOAT, np.float32, None),
            pa.float64(): (DOUBLE, np.float64, None)}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _zigzag(n: int) -> bytes:
    return _varint((n << 1) ^ (n >> 63))


def _thrift(fields: Sequence[tuple[int, int, object]]) -> bytes:
    """A thrift compact struct from ``(field id, type id, value)`` (ids ascending); lists as ``(elem type, items)``."""
    out, last = bytearray(), 0
    for fid, ttype, value in fields:
        if value is None:
            continue
        assert 0 < fid - last <= 15, "field ids ascend in short steps"  # noqa: S101 (the encoding relies on it)
        out.append(((fid - last) << 4) | ttype)
        last = fid
        out += _value(ttype, value)
    out.append(0)
    return bytes(out)


def _value(ttype: int, value) -> bytes:
    if ttype in (T_I32, T_I64):
        return _zigzag(value)
    if ttype == T_BINARY:
        data = value.encode() if isinstance(value, str) else value
        return _varint(len(data)) + data
    if ttype == T_STRUCT:
        return value  # already encoded
    if ttype == T_TRUE:
        return b""
    elem, items = value  # T_LIST
    head = bytes([(len(items) << 4) | elem]) if len(items) < 15 else bytes([0xF0 | elem]) + _varint(len(items))
    return head + b"".join(_value(elem, i) for i in items)


def _rle(count: int, level: int) -> bytes:
    """One run of ``count`` equal levels (bit width at most 8)."""
    return _varint(count << 1) + bytes([level])


def _bitpacked(levels: np.ndarray, width: int) -> bytes:
    """Levels (uint8, below ``2 ** width``; ``width`` 1 or 2) as one bit-packed run, least significant bit first."""
    padded = np.zeros(-(-len(levels) // 8) * 8, np.uint8)
    padded[: len(levels)] = levels
    if width == 1:
        packed = np.packbits(padded, bitorder="little")
    else:
        quads = padded.reshape(-1, 4)
        packed = quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)
    return _varint(((len(padded) // 8) << 1) | 1) + packed.tobytes()


def _levels(encoded: bytes) -> list:
    return [struct.pack("<i", len(encoded)), encoded]


class _Column:
    """One column's schema elements, and the encoding of its pages (one per row group) from slices of its values."""

    def __init__(self, field: pa.Field, all_null: bool, pack: bool) -> None:
        self.name, self.packed, self.all_null = field.name, False, all_null
        kind = field.type
        self.nested = pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind)
        leaf = kind.value_type if self.nested else kind
        if self.all_null and leaf == pa.binary():  # vec_bf16 beside float32 vectors: nulls only, no values
            self.physical, self.numpy, self.converted = BYTE_ARRAY, None, None
            return
        if leaf not in _NUMBERS:
            raise Unsupported(f"{self.name}: {kind}")
        self.physical, self.numpy, self.converted = _NUMBERS[leaf]
        self.packed = pack and self.nested and leaf == pa.float32() and not self.all_null

    def check(self, column: pa.ChunkedArray) -> None:
        """Raise `Unsupported` for values this writer cannot encode (null elements inside a list)."""
        if self.nested and not self.all_null and any(c.values.null_count for c in column.chunks):
            raise Unsupported(f"{self.name}: null list elements")

    def schema(self) -> list[bytes]:
        leaf = [(1, T_I32, self.physical), (3, T_I32, OPTIONAL if not self.nested else REQUIRED),
                (4, T_BINARY, "element" if self.nested else self.name), (6, T_I32, self.converted)]
        if not self.nested:
            return [_thrift(leaf)]
        return [_thrift([(3, T_I32, OPTIONAL), (4, T_BINARY, self.name), (5, T_I32, 1), (6, T_I32, CONVERTED_LIST)]),
                _thrift([(3, T_I32, REPEATED), (4, T_BINARY, "list"), (5, T_I32, 1)]), _thrift(leaf)]

    def page(self, part: pa.Array) -> tuple[list, int, int, np.ndarray | None, int]:
        """The data page of the rows ``part``: its body's parts, its raw size, its level count, values and nulls.

        A packed column's floats are split into four byte streams (the exponent bytes of activations repeat, the
        low mantissa bytes of bfloat16-born values are often zero) and the page is compressed with zstd: about
        0.55 of the raw bytes, every value kept bit for bit.
        """
        body, entries, values = self._page(part, len(part))
        raw = sum(len(b) if isinstance(b, bytes) else b.nbytes for b in body)
        if self.packed:
            body[-1] = np.ascontiguousarray(values.view(np.uint8).reshape(-1, 4).T)
            body = [_CODEC().compress(b"".join(body), asbytes=True)]
        return body, raw, entries, values, part.null_count

    def _page(self, part: pa.Array, n: int) -> tuple[list, int, np.ndarray | None]:
        valid = None if not part.null_count else np.asarray(part.is_valid())
        if self.all_null:
            return (_levels(_rle(n, 0)) if not self.nested else _levels(_rle(n, 0)) + _levels(_rle(n, 0))), n, None
        if not self.nested:
            values = part.to_numpy(zero_copy_only=False) if valid is None else part.drop_null().to_numpy()
            values = np.ascontiguousarray(values, dtype=self.numpy)
            levels = _rle(n, 1) if valid is None else _bitpacked(valid.astype(np.uint8), 1)
            return [*_levels(levels), values], n, values
        if pa.types.is_fixed_size_list(part.type):
            width = part.type.list_size
            lengths = np.where(valid, width, 0) if valid is not None else None
            flat = part.values.slice(part.offset * width, n * width).to_numpy()
            if valid is not None:
                flat = flat.reshape(n, width)[valid].reshape(-1)
        else:
            offsets = part.offsets.to_numpy()
            lengths = np.diff(offsets)
            if (lengths == 0).any():
                raise Unsupported(f"{self.name}: empty lists")
            flat = part.values.slice(offsets[0], offsets[-1] - offsets[0]).to_numpy()
            if valid is not None:
                keep = np.repeat(valid, lengths)
                flat, lengths = flat[keep], np.where(valid, lengths, 0)
            width = None
        flat = np.ascontiguousarray(flat, dtype=self.numpy)
        if lengths is None:  # every row a full vector: the same two runs per row, then one run of definitions
            rep = np.tile(np.frombuffer(_rle(1, 0) + _rle(width - 1, 1), np.uint8), n).tobytes() if width > 1 \
                else _rle(n, 0)
            return [*_levels(rep), *_levels(_rle(n * width, 2)), flat], n * width, flat
        entries = np.maximum(lengths, 1)  # a null row is one entry
        total = int(entries.sum())
        rep = np.ones(total, np.uint8)
        rep[np.cumsum(entries) - entries] = 0
        defined = np.repeat(np.where(lengths > 0, 2, 0).astype(np.uint8), entries)
        def_levels = _rle(total, 2) if valid is None else _bitpacked(defined, 2)
        return [*_levels(_bitpacked(rep, 1)), *_levels(def_levels), flat], total, flat


WRITER = "geomap segment writer"  # the files' ``created_by``: what tells them from pyarrow's


class Unsupported(Exception):
    """A column this writer does not handle (the caller falls back to pyarrow)."""


def _CODEC() -> pa.Codec:  # noqa: N802 (a constant made on first use)
    return pa.Codec("zstd", compression_level=ZSTD_LEVEL)


def _chunk_meta(col: _Column, offset: int, size: int, raw: int, entries: int, values: np.ndarray | None,
                nulls: int, stats: bool) -> bytes:
    statistics = None
    if stats and values is not None and len(values):
        fmt = "<i" if col.physical == INT32 else "<q" if col.physical == INT64 else "<f" if col.physical == FLOAT \
            else "<d"
        statistics = _thrift([(3, T_I64, nulls), (5, T_BINARY, struct.pack(fmt, values.max())),
                              (6, T_BINARY, struct.pack(fmt, values.min()))])
    path = ["list", "element"] if col.nested else []
    meta = _thrift([(1, T_I32, col.physical), (2, T_LIST, (T_I32, [BYTE_STREAM_SPLIT if col.packed else PLAIN, RLE])),
                    (3, T_LIST, (T_BINARY, [col.name, *path])), (4, T_I32, ZSTD if col.packed else UNCOMPRESSED),
                    (5, T_I64, entries), (6, T_I64, raw), (7, T_I64, size), (9, T_I64, offset),
                    (12, T_STRUCT, statistics)])
    return _thrift([(2, T_I64, offset), (3, T_STRUCT, meta)])


def columns_for(schema: pa.Schema, all_null: Sequence[bool], pack: bool) -> list[_Column]:
    """The writer's columns for ``schema``, given which columns hold nulls only; `Unsupported` if it cannot."""
    return [_Column(field, bool(empty), pack) for field, empty in zip(schema, all_null, strict=True)]


def write_parquet(table: pa.Table, row_group_rows: int, statistics: Sequence[str] = (),
                  pack: bool = True) -> list | None:
    """The bytes of ``table`` as a Parquet file, as a list of buffers to write in order; None if unsupported.

    Args:
        table: The rows, already in the order they are to be stored.
        row_group_rows: Rows per row group.
        statistics: Columns whose row groups carry min/max statistics (for DuckDB's filter pushdown).
        pack: Store float vectors as byte streams compressed with zstd (else PLAIN and uncompressed).
    """
    if not table.num_rows:
        return None
    step = max(row_group_rows, 1)
    try:
        columns = columns_for(table.schema, [c.null_count == table.num_rows for c in table.columns], pack)
        return list(stream_parquet(columns, (table.slice(s, step) for s in range(0, table.num_rows, step)),
                                   statistics))
    except Unsupported:
        return None


def stream_parquet(columns: list[_Column], groups: Iterable[pa.Table], statistics: Sequence[str] = ()) -> Iterator:
    """The buffers of a Parquet file, in order, one row group of ``groups`` at a time (`columns_for` their schema).

    Only one row group is encoded and held at a time, so a file of any size is written in the memory of one group.
    The bytes equal `write_parquet`'s for the same rows cut into the same groups. `Unsupported` can still be raised
    midway (a variable list column with an empty list): the caller drops what it wrote and falls back.
    """
    wanted = set(statistics)
    yield MAGIC
    offset, groups_meta, n_rows = len(MAGIC), [], 0
    for group in groups:
        chunks, group_bytes = [], 0
        for col, column in zip(columns, group.columns, strict=True):
            col.check(column)
            part = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
            body, raw, entries, values, nulls = col.page(part)
            size = sum(len(b) if isinstance(b, bytes) else b.nbytes for b in body)
            encoding = BYTE_STREAM_SPLIT if col.packed else PLAIN
            header = _thrift([(1, T_I32, 0), (2, T_I32, raw), (3, T_I32, size),
                              (5, T_STRUCT, _thrift([(1, T_I32, entries), (2, T_I32, encoding), (3, T_I32, RLE),
                                                     (4, T_I32, RLE)]))])
            chunks.append(_chunk_meta(col, offset, len(header) + size, len(header) + raw, entries, values, nulls,
                                      col.name in wanted))
            yield header
            yield from body
            offset += len(header) + size
            group_bytes += len(header) + size
        groups_meta.append(_thrift([(1, T_LIST, (T_STRUCT, chunks)), (2, T_I64, group_bytes),
                                    (3, T_I64, group.num_rows)]))
        n_rows += group.num_rows
    schema = [_thrift([(4, T_BINARY, "schema"), (5, T_I32, len(columns))])]
    for col in columns:
        schema += col.schema()
    footer = _thrift([(1, T_I32, 1), (2, T_LIST, (T_STRUCT, schema)), (3, T_I64, n_rows),
                      (4, T_LIST, (T_STRUCT, groups_meta)), (6, T_BINARY, WRITER)])
    yield from (footer, struct.pack("<i", len(footer)), MAGIC)

"""The segment Parquet writer: values back bit for bit through pyarrow and DuckDB, nulls kept, stats pushed down."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geomap.store.parquet_fast import write_parquet

N, D = 1001, 64


def _table() -> pa.Table:
    rng = np.random.default_rng(1)
    flat = rng.standard_normal(N * D).astype(np.float32)
    flat[5], flat[7] = np.nan, -0.0  # a NaN and a negative zero must survive as they are
    valid = rng.random(N) < 0.8
    lengths = rng.integers(1, 9, N)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    table = pa.table({
        "id": pa.array(np.arange(N, dtype=np.int64)),
        "layer": pa.array((np.arange(N) % 19).astype(np.int16)),
        "norm": pa.array(rng.standard_normal(N).astype(np.float32), mask=~valid),
        "vec": pa.FixedSizeListArray.from_arrays(pa.array(flat), D),
        "bias": pa.FixedSizeListArray.from_arrays(pa.array(flat), D, mask=pa.array(valid)),  # mostly null
        "var": pa.ListArray.from_arrays(offsets, pa.array(rng.standard_normal(int(lengths.sum())).astype(np.float32))),
        "ivar": pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 99, int(lengths.sum())).astype(np.int32)),
                                         mask=pa.array(~valid)),
        "nothing": pa.nulls(N, pa.binary()),
        "novec": pa.nulls(N, pa.list_(pa.float32(), D)),
    })
    return table.slice(3)  # an offset into every buffer, as a sliced batch has


def _bits(values) -> np.ndarray:
    return np.asarray(values, np.float32).view(np.uint32)


@pytest.mark.parametrize("pack", [True, False])
def test_every_value_reads_back_bit_for_bit(tmp_path, pack):
    table = _table()
    path = tmp_path / "s.parquet"
    path.write_bytes(b"".join(bytes(memoryview(p)) for p in write_parquet(table, 100, ["id", "layer"], pack=pack)))
    back = pq.read_table(path)
    assert back.num_rows == table.num_rows
    for name in ("id", "layer", "norm", "ivar", "novec"):
        assert back.column(name).to_pylist() == table.column(name).to_pylist(), name
    assert back.column("nothing").null_count == table.num_rows
    for name in ("vec", "var"):
        want = table.column(name).combine_chunks()
        got = back.column(name).combine_chunks()
        assert np.array_equal(_bits(got.flatten()), _bits(want.flatten())), name
    got, want = back.column("bias").combine_chunks(), table.column("bias").combine_chunks()
    assert got.is_valid().to_pylist() == want.is_valid().to_pylist()
    assert np.array_equal(_bits(got.drop_null().flatten()), _bits(want.drop_null().flatten()))

    con = duckdb.connect()
    rows = con.execute(f"SELECT id, layer, norm, vec::FLOAT[{D}] AS vec, bias, ivar, nothing FROM read_parquet(?) "
                       "ORDER BY id", [str(path)]).fetchnumpy()
    assert np.array_equal(rows["id"], table.column("id").to_numpy())
    assert np.array_equal(_bits(np.stack(rows["vec"])), _bits(table.column("vec").combine_chunks().flatten())
                          .reshape(-1, D))
    assert [None if v is None or v is np.ma.masked else list(v) for v in rows["ivar"]] == \
        table.column("ivar").to_pylist()
    assert sum(v is None or v is np.ma.masked for v in rows["bias"]) == table.column("bias").null_count


def test_row_group_statistics_let_duckdb_skip_row_groups(tmp_path):
    path = tmp_path / "s.parquet"
    path.write_bytes(b"".join(bytes(memoryview(p)) for p in write_parquet(_table(), 100, ["id"])))
    plan = duckdb.connect().execute("EXPLAIN ANALYZE SELECT count(*) FROM read_parquet(?) WHERE id = 500",
                                    [str(path)]).fetchall()[0][1]
    assert "Row Groups Scanned: 1 / 10" in plan


def test_packed_vectors_take_fewer_bytes():
    rng = np.random.default_rng(0)
    bf16_born = (rng.standard_normal(4096 * D).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    table = pa.table({"vec": pa.FixedSizeListArray.from_arrays(pa.array(bf16_born), D)})
    plain = sum(memoryview(p).nbytes for p in write_parquet(table, 1024, pack=False))
    packed = sum(memoryview(p).nbytes for p in write_parquet(table, 1024, pack=True))
    assert packed < 0.6 * plain


def test_a_column_it_does_not_handle_is_left_to_pyarrow():
    table = pa.table({"vec_bf16": pa.array([b"\x00\x01", b"\x02\x03"], pa.binary())})
    assert write_parquet(table, 10) is None
    assert write_parquet(table.slice(0, 0), 10) is None

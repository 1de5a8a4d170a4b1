"""Export and large results: vectors stay float32, bit for bit, in every format; an export streams in bounded memory;
10,000 state vectors fit the default memory budget of store SQL."""

from __future__ import annotations

import csv
import json
import os
import stat
import threading

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from geomap.cli import cli
from geomap.errors import GeomapError
from geomap.store.db import StoreError, connect, ensure_schema, in_transaction
from geomap.store.export import ExportError, export
from geomap.store.segments import layout, segment_dir, store_segments
from geomap.store.sql import SqlMemory, SqlRefused, run_sql
from tests.forked import geomap
from tests.storedb import copy_store

D = 640  # the real model's width


def _vectors(rng, n: int) -> np.ndarray:
    """Random float32 vectors with the values a format could lose: -0.0, subnormals, extremes, many digits."""
    vecs = (rng.standard_normal((n, D)) * 10.0 ** rng.integers(-6, 6, (n, 1))).astype(np.float32)
    special = np.array([-0.0, 1e-45, -1.17e-38, 3.4028235e38, -3.4028235e38, 0.1, 1 / 3, 16777217.0], np.float32)
    vecs[:, : len(special)] = special
    return vecs


def _fill(path, n: int, per_prompt: int = 19, seed: int = 0) -> np.ndarray:
    """A store whose ``states`` hold ``n`` random vectors (prompt, pos 0, layer 0..per_prompt-1); the vectors."""
    rng = np.random.default_rng(seed)
    con = connect(path)
    ensure_schema(con, D)
    con.execute("INSERT INTO runs (id, model, status) VALUES (1, 'synthetic', 'done')")
    out = np.empty((n, D), np.float32)
    for start in range(0, n, 20_000):
        m = min(20_000, n - start)
        vecs = _vectors(rng, m)
        out[start:start + m] = vecs
        ids = np.arange(start, start + m)
        batch = pa.table({"id": ids, "prompt_id": (ids // per_prompt).astype(np.int32), "pos": np.zeros(m, np.int32),
                          "layer": (ids % per_prompt).astype(np.int16), "norm": np.linalg.norm(vecs, axis=1),
                          "cos_final": np.ones(m, np.float32),
                          "vec": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), D)})
        if layout(con) == "segments":  # through the segment writer, in a transaction as a batch is
            batch = batch.append_column("vec_bf16", pa.nulls(m, pa.binary()))
            with in_transaction(con):
                store_segments(con, {"states": batch})
            continue
        con.register("batch", batch)
        con.execute("INSERT INTO states (id, prompt_id, pos, layer, norm, cos_final, vec) "
                    "SELECT id, prompt_id, pos, layer, norm, cos_final, vec FROM batch")
        con.unregister("batch")
    con.close()
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "s.duckdb"
    return path, _fill(path, 10_000)


TRAJECTORY = "SELECT prompt_id, pos, layer, norm, vec FROM states WHERE prompt_id = 3 ORDER BY layer"


def _read(path, fmt: str) -> np.ndarray:
    """The ``vec`` column of an exported file, as float32 rows."""
    if fmt == "parquet":
        table = pq.read_table(path)
    elif fmt == "arrow":
        table = ipc.open_file(pa.memory_map(str(path))).read_all()
    elif fmt == "npy":
        return np.load(path)
    else:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [int(r["layer"]) for r in rows] == list(range(19))
        return np.array([json.loads(r["vec"]) for r in rows], dtype=np.float64).astype(np.float32)
    assert table.schema.field("vec").type == pa.list_(pa.float32(), D)  # float32, not doubles
    assert table.column("layer").to_pylist() == list(range(19))
    return table.column("vec").combine_chunks().flatten().to_numpy().reshape(-1, D)


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "csv", "npy"])
def test_a_trajectory_round_trips_bit_for_bit(store, tmp_path, fmt):
    path, vecs = store
    sql = TRAJECTORY.replace("prompt_id, pos, layer, norm, vec", "vec") if fmt == "npy" else TRAJECTORY
    out = tmp_path / f"t.{fmt}"
    done = export(path, sql, out)
    assert done.rows == 19 and done.format == fmt and out.is_file()
    got = _read(out, fmt)
    assert got.dtype == np.float32 and got.shape == (19, D)
    assert np.array_equal(got.view(np.uint32), vecs[3 * 19:4 * 19].view(np.uint32))  # bit for bit, -0.0 included


def test_a_table_name_exports_the_whole_table(store, tmp_path):
    path, vecs = store
    done = export(path, "states", tmp_path / "all.parquet")
    assert done.rows == len(vecs)
    assert np.array_equal(pq.read_table(tmp_path / "all.parquet").column("vec").combine_chunks().flatten()
                          .to_numpy().reshape(-1, D).view(np.uint32), vecs.view(np.uint32))


@pytest.mark.parametrize(("what", "sql", "error", "match"), [
    ("COPY", "COPY states TO '/tmp/x.csv'", SqlRefused, "COPY"),
    ("a file read", "SELECT * FROM read_csv('/etc/passwd')", SqlRefused, "read_csv"),
    ("a write", "DELETE FROM states", SqlRefused, "DELETE"),
    ("npy of two columns", "SELECT layer, vec FROM states", ExportError, "select one column"),
    ("npy of text", "SELECT 'a' AS t FROM states", ExportError, "numbers only"),
])
def test_refused_exports_leave_no_file(store, tmp_path, what, sql, error, match):
    path, _ = store
    out = tmp_path / "x.npy"
    with pytest.raises(error, match=match):
        export(path, sql, out)
    assert list(tmp_path.iterdir()) == []


def test_ten_thousand_vectors_fit_the_default_budget(store):
    path, vecs = store
    result = run_sql(path, "SELECT id, vec FROM states ORDER BY id LIMIT 10000")
    assert len(result) == 10_000 and not result.truncated
    got = result.to_numpy("vec")
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), vecs.view(np.uint32))
    assert result.to_arrow().schema.field("vec").type == pa.list_(pa.float32(), D)
    assert result.rows[0][1][:3] == [float(v) for v in vecs[0, :3]]  # Python values on demand


def test_a_small_budget_still_refuses_what_does_not_fit(store):
    path, _ = store
    with pytest.raises(SqlMemory, match="memory budget"):
        run_sql(path, "SELECT vec FROM states", memory_mb=16)


def _rss() -> int:
    with open("/proc/self/statm", "rb") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_growth(work) -> tuple[object, int]:
    """Run ``work()`` while a thread samples this process's resident memory; its result and the peak growth."""
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss() - base)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        return work(), peak[0]
    finally:
        done.set()
        thread.join()


def test_a_100k_row_export_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "big.duckdb"
    _fill(path, 100_000, seed=1)  # 256 MB of float32 vectors
    out = tmp_path / "big.parquet"
    export(path, "SELECT * FROM states LIMIT 1", out)  # loads the Parquet writer's libraries: not the data's memory
    done, growth = _peak_growth(lambda: export(path, "states", out))
    assert done.rows == 100_000 and done.bytes > 100_000 * D * 4 * 0.9
    assert growth < 192 * 2**20, growth  # three quarters of the data it wrote: the rows streamed through
    assert pq.ParquetFile(out).metadata.num_rows == 100_000


def test_a_join_over_the_vectors_exports_within_its_memory(store, tmp_path):
    path, vecs = store  # in the segments layout, the private reader keeps no file blocks (they ran out of 32 MB)
    sql = ("SELECT prompt_id, layer, vec FROM states JOIN (SELECT range::INTEGER AS prompt_id FROM range(0, 600, 2)) "
           "USING (prompt_id)")
    done = export(path, sql, tmp_path / "even.parquet")
    even = (np.arange(len(vecs)) // 19) % 2 == 0
    assert done.rows == even.sum()
    got = pq.read_table(tmp_path / "even.parquet")
    order = np.lexsort([got.column("layer").to_numpy(), got.column("prompt_id").to_numpy()])
    rows = got.column("vec").combine_chunks().flatten().to_numpy().reshape(-1, D)[order]
    assert rows.tobytes() == vecs[even].tobytes()


def test_cli_export_writes_and_reports(store, tmp_path):
    path, _ = store
    out = tmp_path / "j.arrow"
    got = CliRunner().invoke(cli, ["export", TRAJECTORY, "--out", str(out), "--db", str(path), "--json"])
    assert got.exit_code == 0, got.output
    assert json.loads(got.output.strip().splitlines()[-1])["rows"] == 19
    assert ipc.open_file(pa.memory_map(str(out))).read_all().num_rows == 19


def test_an_export_past_duckdbs_share_says_whose_memory_ran_out(store, tmp_path):
    path, _ = store
    with pytest.raises(SqlMemory, match=r"DuckDB's working share of it \(1 MB"):
        export(path, "SELECT id, vec FROM states ORDER BY vec[1]", tmp_path / "x.parquet", memory_mb=8)
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize("where", ["store", "wal", "segment", "link"])
def test_an_export_over_the_stores_own_files_is_refused_and_changes_nothing(store, tmp_path, where):
    path = tmp_path / "s.duckdb"
    copy_store(store[0], path)
    before = path.read_bytes()
    out = {"store": path, "wal": path.with_name(path.name + ".wal"), "segment": segment_dir(path) / "x.parquet",
           "link": tmp_path / "link.parquet"}[where]
    if where == "link":
        out.symlink_to(path)
    with pytest.raises(StoreError, match="one of the store's own files"):
        export(path, "prompts", out, fmt="parquet")
    got = geomap("export", "prompts", "--out", str(out), "--format", "parquet", "--db", str(path))
    lines = [line for line in got.stderr.splitlines() if line.strip()]
    assert got.status == 2 and len(lines) == 1 and "one of the store's own files" in lines[0], got.stderr
    assert path.read_bytes() == before
    assert where == "link" or not out.exists() or out == path


def test_an_export_to_a_pipe_is_refused_and_the_pipe_stays_a_pipe(store, tmp_path):
    """An export renames its file into place: over a device or a pipe (``/dev/full`` as root) it would replace it."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(GeomapError, match="not a regular file"):
        export(store[0], "prompts", pipe, fmt="csv")
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # and no temporary file is left beside it

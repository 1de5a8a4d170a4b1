"""Compaction streamed a row group at a time: the same file as the in-memory path, byte for byte, and where sources
overlap or the fast writer cannot encode them, the in-memory path itself."""

from __future__ import annotations

import hashlib

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geomap.store import compaction, segments
from geomap.store.compaction import _merge, compact, foreign, rewrite_foreign
from geomap.store.db import connect
from geomap.store.parquet_fast import WRITER
from geomap.store.segments import SEGMENT_TABLES, Extent, segment_dir, write_segment
from tests.forked import geomap
from tests.store.test_segments import same_rows, stores, tables  # noqa: F401 (the module's fixture of two stores)
from tests.storedb import copy_store

WIDTH = 640  # 2,560 B a vector: about 1,640 rows a row group, so groups straddle the sources below
TYPES = {"vec": pa.list_(pa.float32(), WIDTH), "extra": pa.list_(pa.float32(), 8)}  # as `arrow_types` gives them


def _states(prompts: list[int], seed: int, extra: bool) -> pa.Table:
    """Synthetic `states`-like rows of ``prompts`` (3 positions × 4 layers each), sorted as a segment keeps them.

    ``extra`` is a nullable vector column: present on some rows when true, null on every row otherwise (the
    all-null decision is the whole file's, not one source's).
    """
    rng = np.random.default_rng(seed)
    keys = np.array([(p, pos, layer) for p in sorted(prompts) for pos in range(3) for layer in range(4)], np.int32)
    n = len(keys)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * WIDTH, np.float32)), WIDTH)
    nulls = rng.random(n) < 0.7 if extra else np.ones(n, bool)
    other = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * 8, np.float32)), 8, mask=pa.array(nulls))
    return pa.table({"id": pa.array(seed * 10**6 + np.arange(n, dtype=np.int64)), "prompt_id": keys[:, 0],
                     "pos": keys[:, 1], "layer": pa.array(keys[:, 2].astype(np.int16)), "vec": vec, "extra": other})


def _sources(folder, tables_: list[pa.Table]) -> list[tuple]:
    """Each table written as a segment; their catalog rows (file, bytes, min and max prompt), in prompt order."""
    rows = []
    for t in tables_:
        seg = write_segment(t, "states", folder)
        e = Extent.of(t, "states")
        rows.append((seg.file, seg.bytes, e.min_prompt, e.max_prompt))
    return sorted(rows, key=lambda r: (r[2], r[0]))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_streamed_merge_writes_the_in_memory_file_byte_for_byte(tmp_path, monkeypatch):
    folder = tmp_path / "seg"
    parts = [_states(list(range(28 * i, 28 * i + 28)), seed=i, extra=i % 2 == 1) for i in range(5)]  # 336 rows each
    parts += [_states(list(range(140, 240)), seed=9, extra=False)]  # 1,200 rows: one source spans row groups
    group = _sources(folder, parts)
    streamed = []
    monkeypatch.setattr(compaction, "_streamed", lambda *a, f=compaction._streamed: streamed.append(1) or f(*a))
    a, extent_a = _merge(folder, "states", group, TYPES, stream=True)
    b, extent_b = _merge(folder, "states", group, TYPES, stream=False)
    assert streamed == [1]  # the streamed path ran (and did not fall back)
    assert (a.sha256, a.bytes, a.rows) == (b.sha256, b.bytes, b.rows) == (_sha(folder / a.file), a.bytes, 2880)
    assert extent_a == extent_b == Extent(0, 239, 9 * 10**6 + 1199)
    got = pq.read_table(folder / a.file)
    assert same_rows(got, pa.concat_tables(parts))
    assert pq.ParquetFile(folder / a.file).metadata.num_row_groups > 1
    with duckdb.connect() as con:  # DuckDB's reader agrees: the nullable column's nulls and values survive
        nulls = con.sql("SELECT count(*) FILTER (WHERE extra IS NULL), sum(vec[1]) "
                        f"FROM '{folder / a.file}'").fetchall()
    expected = pa.concat_tables(parts)
    assert nulls[0][0] == expected.column("extra").null_count
    assert nulls[0][1] == pytest.approx(float(np.sum([v[0] for v in expected.column("vec").to_pylist()])), rel=1e-5)


def test_overlapping_sources_are_merged_in_memory_and_come_out_sorted(tmp_path, monkeypatch):
    folder = tmp_path / "seg"
    evens, odds = _states(list(range(0, 40, 2)), seed=1, extra=True), _states(list(range(1, 40, 2)), seed=2, extra=True)
    group = _sources(folder, [evens, odds])  # prompt ranges 0–38 and 1–39 overlap
    monkeypatch.setattr(compaction, "_streamed", lambda *a: pytest.fail("overlapping sources were streamed"))
    seg, extent = _merge(folder, "states", group, TYPES, stream=True)
    got = pq.read_table(folder / seg.file)
    keys = np.stack([got.column(k).to_numpy() for k in ("prompt_id", "pos", "layer")], 1)
    assert (np.diff(keys[:, 0]) >= 0).all() and got.num_rows == evens.num_rows + odds.num_rows
    assert extent == Extent(0, 39, 2 * 10**6 + odds.num_rows - 1)


def test_what_the_fast_writer_cannot_encode_falls_back_to_the_in_memory_path(tmp_path):
    folder = tmp_path / "seg"
    parts = []
    for i in range(3):
        t = _states(list(range(10 * i, 10 * i + 10)), seed=i, extra=False)
        parts.append(t.append_column("vec_bf16", pa.array([b"\x00\x01"] * t.num_rows, pa.binary())))
    group = _sources(folder, parts)
    seg, _ = _merge(folder, "states", group, TYPES, stream=True)
    ref, _ = _merge(folder, "states", group, TYPES, stream=False)
    assert seg.sha256 == ref.sha256
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # the abandoned stream left no temp file
    assert same_rows(pq.read_table(folder / seg.file), pa.concat_tables(parts))


def test_compacting_a_real_store_streams_and_matches_the_in_memory_path(stores, tmp_path, monkeypatch):  # noqa: F811
    catalogs, files, streamed = [], [], []

    def counted(paths, name, *rest, f=compaction._streamed):
        out = f(paths, name, *rest)
        streamed.append(name)
        return out

    monkeypatch.setattr(compaction, "_streamed", counted)
    for stream in (True, False):
        db = tmp_path / f"s{int(stream)}.duckdb"
        copy_store(stores["seg"], db)
        before = tables(db)
        con = connect(db)
        try:
            replaced = compact(con, stream=stream)
            assert set(replaced) == set(SEGMENT_TABLES)
            assert sorted(streamed) == (sorted(SEGMENT_TABLES) if stream else [])  # each table's merge streamed
            streamed.clear()
            catalogs.append(con.execute("SELECT table_name, rows, bytes, sha256, min_prompt, max_prompt, max_id "
                                        "FROM internal.segments ORDER BY ALL").fetchall())
        finally:
            con.close()
        after = tables(db)
        assert all(same_rows(after[n], before[n]) for n in SEGMENT_TABLES)
        files.append(len(list(segment_dir(db).iterdir())))
        writers = {pq.ParquetFile(p).metadata.created_by for p in segment_dir(db).iterdir()}
        assert writers == {"geomap segment writer"}  # vectors read back as lists were typed again: no fallback
    assert catalogs[0] == catalogs[1]  # every compacted file the same, byte for byte (by sha256)
    assert files[0] == files[1] == len(catalogs[0])  # and nothing else is left in the folder


def _writers(db) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in segment_dir(db).iterdir():
        out.setdefault(p.name.split("-")[0], set()).add(pq.read_metadata(p).created_by)
    return out


def test_store_compact_rewrites_what_an_older_compaction_left_to_pyarrow(stores, tmp_path, monkeypatch):  # noqa: F811
    db = tmp_path / "old.duckdb"
    copy_store(stores["seg"], db)
    before = tables(db)
    con = connect(db)
    try:
        with monkeypatch.context() as m:  # before fb7a196, contributions' compaction fell back to pyarrow's writer
            m.setattr(segments, "write_parquet", lambda *args, **kwargs: None)
            compact(con, names=["contributions"], stream=False)
        compact(con)
        old = [p for p in segment_dir(db).iterdir() if pq.read_metadata(p).created_by != WRITER]
        assert [p.name.split("-")[0] for p in old] == ["contributions"]  # its null attn_bias rows fell back
        assert pq.read_metadata(old[0]).row_group(0).column(4).compression == "UNCOMPRESSED"
        assert rewrite_foreign(con) == {"contributions": 1}
        assert _writers(db) == {name: {WRITER} for name in SEGMENT_TABLES}
        assert (segment_dir(db) / old[0].name).exists() is False  # retired and removed (no grace: held alone)
        assert rewrite_foreign(con) == {}  # idempotent
        assert compact(con) == {}
        files = {r[0] for r in con.execute("SELECT file FROM internal.segments").fetchall()}
    finally:
        con.close()
    assert files == {p.name for p in segment_dir(db).iterdir()}
    after = tables(db)
    assert all(same_rows(after[n], before[n]) for n in SEGMENT_TABLES)


def test_a_file_only_pyarrow_can_write_is_not_foreign(tmp_path):
    folder = tmp_path / "seg"
    t = _states([1, 2], seed=1, extra=False)
    bf16 = pa.array([np.frombuffer(np.ones(WIDTH, np.uint16).tobytes(), np.uint8).tobytes()] * t.num_rows, pa.binary())
    seg = write_segment(t.drop_columns(["vec", "extra"]).append_column("vec_bf16", bf16), "states", folder)
    assert pq.read_metadata(folder / seg.file).created_by != WRITER  # the fallback
    assert not foreign(folder / seg.file, {}, pack=True)  # rewriting would give the same file again
    pq.write_table(t, folder / "states-old.parquet", compression="none")
    assert foreign(folder / "states-old.parquet", TYPES, pack=True)  # float vectors geomap's writer now takes
    ours = write_segment(t, "states", folder)
    assert not foreign(folder / ours.file, TYPES, pack=True)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_store_compact_names_a_damaged_or_missing_segment_in_one_line(stores, tmp_path, damage):  # noqa: F811
    db = tmp_path / "store.duckdb"
    copy_store(stores["seg"], db)
    con = duckdb.connect(str(db), read_only=True)
    try:
        before = con.execute("SELECT * FROM internal.segments ORDER BY file").fetchall()
    finally:
        con.close()
    victim = segment_dir(db) / next(r[0] for r in before if r[1] == "states")
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:100])
    done = geomap("store", "compact", "--db", str(db))
    assert done.status == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: The store's segment file") and str(victim) in lines[0], lines[0]
    assert ("is missing" if damage == "missing" else "cannot be read") in lines[0]
    con = duckdb.connect(str(db), read_only=True)
    try:  # the states' catalog is as it was: nothing of the damaged table was compacted
        after = con.execute("SELECT * FROM internal.segments WHERE table_name = 'states' ORDER BY file").fetchall()
    finally:
        con.close()
    assert after == [r for r in before if r[1] == "states"]


def test_a_folder_inside_the_segment_folder_stops_no_writer(stores, tmp_path):  # noqa: F811
    db = tmp_path / "store.duckdb"
    copy_store(stores["seg"], db)
    (segment_dir(db) / "notes").mkdir()  # a folder someone made there (was: every writer failed on it)
    (segment_dir(db) / "notes" / "keep.txt").write_text("mine")
    done = geomap("store", "compact", "--db", str(db))
    assert done.status == 0, done.stderr
    assert (segment_dir(db) / "notes" / "keep.txt").read_text() == "mine"

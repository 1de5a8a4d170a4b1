"""Vector segments: the same tables bit for bit, files that match their catalog, orphans, compaction, migration and
user SQL that reaches the segments only through the views."""

from __future__ import annotations

import shutil

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from geomap.capture import CaptureConfig
from geomap.digest import sha256_of
from geomap.ingest.engine import ingest
from geomap.store.compaction import compact
from geomap.store.db import connect, ensure_schema
from geomap.store.segment_migrate import migrate
from geomap.store.segments import LAYOUT_ENV, SEGMENT_TABLES, layout, remove_orphans, segment_dir
from geomap.store.sql import SqlRefused, run_sql, sql_connection_config
from geomap.store.writer import PromptSpec
from tests.storedb import copy_store

PROMPTS = [f"Prompt {i}: the storm is {'very ' * (i % 3)}close" for i in range(7)] + [""]
ALL = CaptureConfig(attn_positions="all", lens_positions="all", top_k=5)
ORDER = {"states": "id", "contributions": "prompt_id, pos, layer", "attention": "prompt_id, layer, head, pos",
         "final_logits": "prompt_id, chunk"}


def _ingest(model, db, monkeypatch, layout_name: str, prompts=PROMPTS, batch_size: int = 2) -> None:
    monkeypatch.setenv(LAYOUT_ENV, layout_name)
    ingest(model, [PromptSpec(t) for t in prompts], db, ALL, batch_size=batch_size, progress=False)


def _bits(column: pa.ChunkedArray) -> tuple:
    """A column as comparable bytes: its null mask and its (flattened) values' bits, so NaN equals NaN."""
    column = column.combine_chunks()
    nulls = column.is_null().to_pylist()
    values = column
    while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = pc.list_flatten(values)
    if pa.types.is_floating(values.type) or pa.types.is_integer(values.type):
        return nulls, np.asarray(values.fill_null(0).to_numpy(zero_copy_only=False)).tobytes()
    return nulls, values.to_pylist()


def same_rows(a: pa.Table, b: pa.Table) -> bool:
    """Whether two tables hold the same column names and the same values bit for bit."""
    return a.column_names == b.column_names and all(_bits(a[c]) == _bits(b[c]) for c in a.column_names)


def tables(db) -> dict:
    """Every row of the vector tables (floats as stored bytes, so NaN compares equal), and their column types."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        out = {}
        for name in SEGMENT_TABLES:
            out[name, "types"] = [r[:2] for r in con.execute(f"DESCRIBE {name}").fetchall()]
            out[name] = con.sql(f"SELECT * FROM {name} ORDER BY {ORDER[name]}").to_arrow_table()
        return out
    finally:
        con.close()


@pytest.fixture(scope="module")
def stores(tiny_models, tmp_path_factory):
    """The same prompts ingested into a rows store and a segments store."""
    root = tmp_path_factory.mktemp("segments")
    mp = pytest.MonkeyPatch()
    try:
        _ingest(tiny_models["llama"], root / "rows.duckdb", mp, "rows")
        _ingest(tiny_models["llama"], root / "seg.duckdb", mp, "segments")
    finally:
        mp.undo()
    return {"rows": root / "rows.duckdb", "seg": root / "seg.duckdb", "root": root}


def test_segments_hold_the_same_rows_bit_for_bit_under_the_same_types(stores):
    rows, seg = tables(stores["rows"]), tables(stores["seg"])
    for name in SEGMENT_TABLES:
        assert seg[name, "types"] == rows[name, "types"]  # vec stays FLOAT[d], logits FLOAT[4096]
        assert seg[name].num_rows == rows[name].num_rows > 0
        assert same_rows(seg[name], rows[name]), name  # the float bits, NaN padding included
    con = duckdb.connect(str(stores["seg"]), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM internal.states_rows").fetchall()[0][0] == 0  # all in segments
        assert con.execute("SELECT typeof(vec) FROM states LIMIT 1").fetchall()[0][0].startswith("FLOAT[")
    finally:
        con.close()


def test_every_segment_matches_its_catalog_row_and_is_sorted(stores):
    folder = segment_dir(stores["seg"])
    con = duckdb.connect(str(stores["seg"]), read_only=True)
    try:
        catalog = con.execute("SELECT file, table_name, rows, bytes, sha256, min_prompt, max_prompt "
                              "FROM internal.segments").fetchall()
    finally:
        con.close()
    assert sorted(p.name for p in folder.iterdir()) == sorted(r[0] for r in catalog)
    assert {r[1] for r in catalog} == set(SEGMENT_TABLES)
    for file, _name, n, size, digest, lo, hi in catalog:
        path = folder / file
        assert (path.stat().st_size, sha256_of(path)) == (size, digest)
        table = pq.read_table(path)
        assert table.num_rows == n
        keys = list(zip(*(table.column(k).to_pylist() for k in ("prompt_id", "pos", "layer") if k in
                          table.column_names)))
        assert keys == sorted(keys)
        prompts = table.column("prompt_id").to_pylist()
        assert (min(prompts), max(prompts)) == (lo, hi)


def test_an_orphan_segment_is_removed_when_the_store_is_next_opened_for_writing(stores, tiny_models, monkeypatch,
                                                                                tmp_path):
    import shutil

    db = tmp_path / "s.duckdb"
    copy_store(stores["seg"], db)
    folder = segment_dir(db)
    orphan, temp = folder / "states-0123456789abcdef.parquet", folder / ".states-fedcba9876543210.parquet.tmp"
    shutil.copy(next(folder.glob("states-*.parquet")), orphan)  # renamed into place, its transaction never committed
    temp.write_bytes(b"half a segment")
    before = tables(db)
    _ingest(tiny_models["llama"], db, monkeypatch, "rows", prompts=PROMPTS[:2])  # all stored already: no new rows
    assert not orphan.exists() and not temp.exists()
    after = tables(db)
    assert all(same_rows(after[n], before[n]) for n in SEGMENT_TABLES)


def test_compaction_merges_segments_keeps_every_row_and_is_idempotent(stores, tmp_path):

    db = tmp_path / "c.duckdb"
    copy_store(stores["seg"], db)
    before = tables(db)
    con = connect(db)
    try:
        n_before = con.execute("SELECT count(*) FROM internal.segments").fetchall()[0][0]
        replaced = compact(con)
        n_after = con.execute("SELECT count(*) FROM internal.segments").fetchall()[0][0]
        assert sum(replaced.values()) > 0 and n_after == len(SEGMENT_TABLES) < n_before
        assert compact(con) == {}  # nothing small is left to merge
        assert not con.execute("SELECT count(*) FROM internal.retired_segments").fetchall()[0][0]
    finally:
        con.close()
    assert len(list(segment_dir(db).iterdir())) == n_after  # the replaced files are gone
    after = tables(db)
    assert all(same_rows(after[n], before[n]) for n in SEGMENT_TABLES)


def test_migration_moves_an_old_store_into_segments_bit_for_bit(stores, tmp_path):
    import shutil

    db = tmp_path / "m.duckdb"
    shutil.copy(stores["rows"], db)  # written by today's row writer
    before = tables(db)
    con = connect(db)
    try:
        assert layout(con) == "rows"
        moved = migrate(con, prompts_per_segment=3)
        assert layout(con) == "segments" and moved["states"] == before["states"].num_rows
        assert migrate(con) == {}  # a rerun finds nothing left to move
        ensure_schema(con)
        assert all(con.execute(f"SELECT count(*) FROM internal.{n}_rows").fetchall()[0][0] == 0 for n in SEGMENT_TABLES)
    finally:
        con.close()
    after = tables(db)
    for name in SEGMENT_TABLES:
        assert after[name, "types"] == before[name, "types"]
        assert same_rows(after[name], before[name]), name


def test_a_new_store_gets_segments_and_an_old_rows_store_stays_rows_when_appended(stores, tiny_models, tmp_path,
                                                                                  monkeypatch):
    import shutil

    monkeypatch.delenv(LAYOUT_ENV, raising=False)  # the default layout
    more = [f"Another prompt {i}: the sea is calm" for i in range(3)]
    fresh = tmp_path / "fresh.duckdb"
    ingest(tiny_models["llama"], [PromptSpec(t) for t in more], fresh, ALL, batch_size=2, progress=False)
    old = tmp_path / "old.duckdb"
    shutil.copy(stores["rows"], old)  # a store written in the rows layout, appended to now
    shutil.copytree(stores["root"] / "rows.indexes", tmp_path / "old.indexes")
    before = tables(old)
    ingest(tiny_models["llama"], [PromptSpec(t) for t in more], old, ALL, batch_size=2, progress=False)
    with duckdb.connect(str(fresh), read_only=True) as con:
        assert layout(con) == "segments" and con.execute("SELECT count(*) FROM internal.segments").fetchall()[0][0]
        fresh_states = con.execute("SELECT count(*) FROM states").fetchall()[0][0]
    with duckdb.connect(str(old), read_only=True) as con:
        assert layout(con) == "rows" and not segment_dir(old).exists()
        assert con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'states'").fetchall() == [(1,)]
    after = tables(old)
    assert after["states"].num_rows == before["states"].num_rows + fresh_states
    for name in SEGMENT_TABLES:
        assert after[name, "types"] == before[name, "types"]
        assert same_rows(after[name].slice(0, before[name].num_rows), before[name]), name  # older rows untouched


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_parquet('{segment}')",
    "SELECT * FROM parquet_scan('{segment}')",
    "SELECT * FROM read_blob('{store}')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM glob('{folder}/*')",
    "SELECT * FROM '{segment}'",
])
def test_user_sql_cannot_name_a_segment_the_store_or_any_other_file(stores, query):
    folder = segment_dir(stores["seg"])
    segment = next(folder.glob("states-*.parquet"))
    with pytest.raises(SqlRefused):
        run_sql(stores["seg"], query.format(segment=segment, store=stores["seg"], folder=folder))


def test_user_sql_reads_the_views_and_the_locked_connection_reaches_only_the_segment_folder(stores):
    result = run_sql(stores["seg"], "SELECT count(*), typeof(any_value(vec)) FROM states")
    assert result.rows[0][0] > 0 and result.rows[0][1].startswith("FLOAT[")
    con = connect(stores["seg"], read_only=True, config=sql_connection_config())
    try:
        assert con.execute("SELECT count(*) FROM final_logits").fetchall()[0][0] > 0
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("SET allowed_directories = ['/']")
        with pytest.raises(duckdb.Error, match="(?i)permission|disabled"):
            con.execute("SELECT * FROM read_text('/etc/passwd')").fetchall()
        with pytest.raises(duckdb.Error, match="(?i)permission|disabled"):
            con.execute(f"SELECT * FROM read_text('{segment_dir(stores['seg'])}/../x')").fetchall()
    finally:
        con.close()


def test_retired_segments_stay_for_their_grace_then_go(stores, tmp_path):

    db = tmp_path / "g.duckdb"
    copy_store(stores["seg"], db)
    con = connect(db)
    try:
        before = {n: con.execute(f"SELECT count(*) FROM {n}").fetchall()[0][0] for n in SEGMENT_TABLES}
        compact(con, grace_s=600)  # as a writer sharing its instance with readers compacts
        retired = [r[0] for r in con.execute("SELECT file FROM internal.retired_segments").fetchall()]
        assert retired and all((segment_dir(db) / f).is_file() for f in retired)  # a reader may still read them
        assert remove_orphans(con, 600) == []
        assert {n: con.execute(f"SELECT count(*) FROM {n}").fetchall()[0][0] for n in SEGMENT_TABLES} == before
        assert sorted(remove_orphans(con, 0)) == sorted(retired)
        live = sorted(r[0] for r in con.execute("SELECT file FROM internal.segments").fetchall())
    finally:
        con.close()
    assert sorted(p.name for p in segment_dir(db).iterdir()) == live


SCALAR_VIEWS = {"trajectory": "prompt_id, pos, layer", "layer_curves": "prompt_id, pos, layer",
                "position_stats": "prompt_id, pos"}


def scalar_views(db) -> dict:
    """Every row of the views that read the states' scalars, floats as stored bytes."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {name: con.sql(f"SELECT * FROM {name} ORDER BY {order}").to_arrow_table()
                for name, order in SCALAR_VIEWS.items()}
    finally:
        con.close()


def as_before_scalars(db) -> None:
    """Turn a segments store into one written before ``internal.state_scalars``: its views read ``states``."""
    con = duckdb.connect(str(db))
    try:
        for name in SCALAR_VIEWS:
            sql = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = ? AND schema_name = 'main'",
                              [name]).fetchall()[0][0]
            old = sql.replace("internal.state_scalars", "states")
            con.execute(old.replace("CREATE VIEW", "CREATE OR REPLACE VIEW"))
        con.execute("DROP TABLE internal.state_scalars")
        con.execute("DELETE FROM store_meta WHERE key = 'schema_sha256'")
    finally:
        con.close()


def test_the_trajectory_views_give_the_same_rows_in_both_layouts(stores):
    rows, seg = scalar_views(stores["rows"]), scalar_views(stores["seg"])
    for name in SCALAR_VIEWS:
        assert seg[name].num_rows == rows[name].num_rows > 0
        assert same_rows(seg[name], rows[name]), name
    con = duckdb.connect(str(stores["seg"]), read_only=True)
    try:  # in a segments store they read a DuckDB table, no segment file; in a rows store a view over `states`
        assert con.execute("SELECT table_type FROM information_schema.tables WHERE table_schema = 'internal' AND "
                           "table_name = 'state_scalars'").fetchall() == [("BASE TABLE",)]
        plan = con.execute("EXPLAIN SELECT * FROM trajectory WHERE prompt_id = 2").fetchall()[0][1]
        assert "READ_PARQUET" not in plan.upper() and "state_scalars" in plan
    finally:
        con.close()


def test_a_segments_store_written_before_the_scalars_table_is_backfilled(stores, tmp_path):

    db = tmp_path / "b.duckdb"
    copy_store(stores["seg"], db)
    before = scalar_views(stores["seg"])
    as_before_scalars(db)
    assert all(same_rows(scalar_views(db)[n], before[n]) for n in SCALAR_VIEWS)  # the old views read `states`
    con = connect(db)
    try:
        ensure_schema(con)  # what any writer does first
        n = con.execute("SELECT count(*) FROM internal.state_scalars").fetchall()[0][0]
        assert n == con.execute("SELECT count(*) FROM states").fetchall()[0][0] > 0
        ensure_schema(con)  # idempotent
        assert con.execute("SELECT count(*) FROM internal.state_scalars").fetchall()[0][0] == n
    finally:
        con.close()
    after = scalar_views(db)
    assert all(same_rows(after[n], before[n]) for n in SCALAR_VIEWS)


def test_a_prompts_rows_from_its_own_segments_equal_the_views(stores):
    from geomap.store.scalars import of_prompt

    con = connect(stores["seg"], read_only=True, config=sql_connection_config())  # as a served store reads
    try:
        for name in SEGMENT_TABLES:
            for prompt in (1, 4, 999):
                relation = of_prompt(con, name, prompt)
                assert "read_parquet" in relation or prompt == 999
                own = con.sql(f"SELECT * FROM {relation} WHERE prompt_id = {prompt} ORDER BY ALL").to_arrow_table()
                view = con.sql(f"SELECT * FROM {name} WHERE prompt_id = {prompt} ORDER BY ALL").to_arrow_table()
                assert own.schema == view.schema and same_rows(own, view), (name, prompt)
    finally:
        con.close()
    rows = connect(stores["rows"], read_only=True)
    try:
        assert of_prompt(rows, "states", 1) == "states"
    finally:
        rows.close()


def test_a_journey_report_reads_the_same_page_from_both_layouts(stores, tiny_models, tmp_path):

    from geomap.report.api import journey_report

    pages = {}
    for name in ("rows", "seg"):
        db = tmp_path / f"{name}.duckdb"
        copy_store(stores[name], db, indexes=True)
        pages[name] = journey_report(db, 3, loaded=tiny_models["llama"], write=False).html
    assert pages["seg"] == pages["rows"]  # vectors, attention, contributions, logits and neighbours alike


def test_a_store_moved_with_its_folder_reads_its_own_segments_read_only(stores, tmp_path):
    first, moved = tmp_path / "a" / "s.duckdb", tmp_path / "b" / "s.duckdb"
    first.parent.mkdir()
    moved.parent.mkdir()
    copy_store(stores["seg"], first)
    with connect(first) as con:  # a writer opens it: its views name the folder beside it
        ensure_schema(con)
    copy_store(first, moved)
    shutil.rmtree(segment_dir(first))  # the place the moved store's views were written for is gone
    want = tables(stores["seg"])
    con = duckdb.connect(str(moved), read_only=True)
    try:
        assert str(segment_dir(first)) in con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'states' "
                                                      "AND NOT temporary").fetchone()[0]
    finally:
        con.close()
    got = run_sql(moved, "SELECT * FROM states ORDER BY id", max_rows=10**7).to_arrow()
    assert same_rows(got, want["states"])
    for name in SEGMENT_TABLES:  # geomap's own read-only opens read every table from the folder beside the file
        assert run_sql(moved, f"SELECT count(*) FROM {name}").rows == [(want[name].num_rows,)]

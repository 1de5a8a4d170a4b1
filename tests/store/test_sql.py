"""Read-only user SQL against a real store file: lockdown, refusals, time limit, row cap, output formats."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
from decimal import Decimal

import duckdb
import pandas as pd
import pyarrow as pa
import pytest

from geomap.errors import GeomapError
from geomap.store.db import StoreError, connect, ensure_schema
from geomap.store.sql import SqlError, SqlRefused, SqlTimeout, run_sql, sql_connection_config
from geomap.store.sql_result import SqlResult


def _snapshot(path):
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = con.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()
        runs = con.execute("SELECT * FROM runs ORDER BY id").fetchall()
        prompts = con.execute("SELECT * FROM prompts ORDER BY id").fetchall()
        settings = con.execute("SELECT name, value FROM duckdb_settings() ORDER BY name").fetchall()
        return tables, runs, prompts, settings
    finally:
        con.close()


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store.duckdb"
    con = connect(path)
    ensure_schema(con, 8)
    con.execute("INSERT INTO runs (id, model, status) VALUES (1, 'tiny', 'done'), (2, 'tiny', 'failed')")
    con.execute(
        "INSERT INTO prompts (id, key, run_id, text, tags, n_tokens, status) VALUES "
        "(1, 'k1', 1, 'hello world', ['a', 'b'], 3, 'done'), (2, 'k2', 1, 'second', [], 2, 'done')"
    )
    con.execute(
        "INSERT INTO vocab VALUES ('w', 7, 'é', '\\xC3\\xA9'::BLOB, false), ('w', 8, '?', '\\xC3'::BLOB, false)"
    )
    con.close()
    return path


def test_select_reads_the_store(store):
    res = run_sql(store, "SELECT id, model, status FROM runs ORDER BY id")
    assert res.columns == ["id", "model", "status"]
    assert res.rows == [(1, "tiny", "done"), (2, "tiny", "failed")]
    assert res.truncated is False and res.elapsed_s >= 0
    assert run_sql(store, "SELECT text FROM prompts WHERE id = ?", [2]).rows == [("second",)]
    assert run_sql(store, "SELECT text FROM prompts WHERE id = $id", {"id": 1}).rows == [("hello world",)]
    for query in ["DESCRIBE runs", "SHOW TABLES", "SUMMARIZE runs", "FROM journey", "EXPLAIN SELECT 1",
                  "PRAGMA table_info('runs')", "PIVOT runs ON status USING count(*) GROUP BY model", "SELECT 1;"]:
        assert run_sql(store, query).columns


def test_config_keys_are_accepted_and_locked(store):
    con = duckdb.connect(str(store), read_only=True, config=sql_connection_config())
    try:
        row = con.execute("SELECT current_setting('enable_external_access'), current_setting('lock_configuration'), "
                          "current_setting('python_enable_replacements')").fetchone()
        assert row == (False, True, False)
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("SET enable_external_access = true")
    finally:
        con.close()


def test_python_variables_are_not_visible(store):
    secret_df = pd.DataFrame({"password": ["hunter2"]})  # noqa: F841 - a replacement scan would find it by name
    with pytest.raises(SqlError, match="secret_df"):
        run_sql(store, "SELECT * FROM secret_df")


REFUSED = {
    "insert": "INSERT INTO runs (id) VALUES (9)",
    "update": "UPDATE runs SET model = 'x'",
    "delete": "DELETE FROM runs",
    "create": "CREATE TABLE t (a INTEGER)",
    "create temp": "CREATE TEMP TABLE t (a INTEGER)",
    "drop": "DROP TABLE runs",
    "alter": "ALTER TABLE runs ADD COLUMN x INTEGER",
    "attach": "ATTACH '/tmp/other.duckdb' AS other",
    "detach": "DETACH store",
    "copy to": "COPY runs TO '/tmp/runs.csv'",
    "copy from": "COPY runs FROM '/etc/passwd'",
    "export": "EXPORT DATABASE '/tmp/dump'",
    "read_csv": "SELECT * FROM read_csv('/etc/passwd')",
    "read_parquet": "SELECT * FROM read_parquet('/tmp/x.parquet')",
    "read_text": "SELECT * FROM read_text('/etc/passwd')",
    "read_blob": "SELECT * FROM read_blob('/etc/passwd')",
    "read_json": "SELECT * FROM read_json('/etc/passwd')",
    "glob": "SELECT * FROM glob('/etc/*')",
    "file in subquery": "SELECT (SELECT count(*) FROM read_csv('/etc/passwd')) AS n",
    "install": "INSTALL httpfs",
    "load": "LOAD json",
    "set": "SET threads = 1",
    "set external": "SET enable_external_access = true",
    "reset": "RESET threads",
    "pragma set": "PRAGMA threads = 1",
    "pragma config": "PRAGMA enable_profiling",
    "set variable": "SET VARIABLE x = 1",
    "transaction": "BEGIN TRANSACTION",
    "multiple": "SELECT 1; DROP TABLE runs",
    "multiple reads": "SELECT 1; SELECT 2",
}


@pytest.mark.parametrize("sql", REFUSED.values(), ids=REFUSED.keys())
def test_refused_and_store_unchanged(store, sql):
    before = _snapshot(store)
    with pytest.raises(SqlRefused, match="Refused") as info:
        run_sql(store, sql)
    assert not isinstance(info.value, SqlTimeout)
    assert _snapshot(store) == before


def test_refusal_messages_name_what_was_refused(store):
    with pytest.raises(SqlRefused, match=r"2 statements"):
        run_sql(store, "SELECT 1; DROP TABLE runs")
    with pytest.raises(SqlRefused, match=r"INSERT .*writes to the store"):
        run_sql(store, "INSERT INTO runs (id) VALUES (9)")
    with pytest.raises(SqlRefused, match=r"read_csv\('/etc/passwd'\) reaches outside the store: files cannot be read"):
        run_sql(store, "SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(SqlRefused, match=r"INSTALL .*extension"):
        run_sql(store, "INSTALL httpfs")
    with pytest.raises(SqlRefused, match=r"changes a setting"):
        run_sql(store, "PRAGMA enable_profiling")


def test_duckdb_itself_enforces_the_lockdown(store):
    """Without the pre-check, the connection config alone blocks writes, files and setting changes."""
    con = duckdb.connect(str(store), read_only=True, config=sql_connection_config())
    try:
        for sql in ["DROP TABLE runs", "SELECT * FROM read_csv('/etc/passwd')", "COPY runs TO '/tmp/r.csv'",
                    "SET threads = 1", "INSTALL httpfs"]:
            with pytest.raises(duckdb.Error):
                con.execute(sql)
    finally:
        con.close()


def test_time_limit(store):
    start = time.perf_counter()
    with pytest.raises(SqlTimeout, match="time limit of 1 s"):
        run_sql(store, "SELECT count(*) FROM range(10000000000000)", time_limit=1.0)
    assert time.perf_counter() - start < 5
    assert run_sql(store, "SELECT count(*) FROM runs", time_limit=1.0).rows == [(2,)]  # store still usable


def test_row_cap(store):
    res = run_sql(store, "SELECT * FROM range(25)", max_rows=10)
    assert res.rows == [(i,) for i in range(10)] and res.truncated
    res = run_sql(store, "SELECT * FROM range(10)", max_rows=10)
    assert len(res.rows) == 10 and not res.truncated
    start = time.perf_counter()
    res = run_sql(store, "SELECT * FROM range(10000000000000)", max_rows=5)  # streamed, not materialised
    assert res.truncated and len(res.rows) == 5 and time.perf_counter() - start < 5


@pytest.mark.parametrize("sql", ["SELEC 1", "SELECT * FROM no_such_table", "SELECT nope FROM runs", ""])
def test_sql_errors(store, sql):
    with pytest.raises(SqlError) as info:
        run_sql(store, sql)
    assert isinstance(info.value, GeomapError) and not isinstance(info.value, SqlRefused)


def test_syntax_error_keeps_duckdb_message(store):
    with pytest.raises(SqlError, match='syntax error at or near "SELEC"'):
        run_sql(store, "SELEC 1")
    with pytest.raises(SqlError, match="no_such_table"):
        run_sql(store, "SELECT * FROM no_such_table")
    with pytest.raises(SqlError) as info:  # one line: DuckDB's caret under the quoted line becomes a position
        run_sql(store, "SELECT 1\n  FROM prompts\n  WHER id = 1")
    message = str(info.value)
    assert "\n" not in message and "^" not in message and "LINE" not in message, message
    assert message.startswith('SQL error: Parser Error: syntax error at or near "id" (line 3, column 8)'), message


def test_an_error_in_a_long_line_names_its_column_in_the_line(store):
    """DuckDB quotes a window of a long line ("..." at the cut): the column counts from the line's start."""
    columns = ", ".join(f"id AS c{i}" for i in range(40))
    sql = f"SELECT 1,\n  {columns} FROM FROM prompts"
    with pytest.raises(SqlError) as info:
        run_sql(store, sql)
    column = sql.splitlines()[1].index("FROM FROM") + len("FROM ") + 1
    assert column > 100  # past DuckDB's window
    assert f'syntax error at or near "FROM" (line 2, column {column})' in str(info.value), str(info.value)


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="No store"):
        run_sql(tmp_path / "absent.duckdb", "SELECT 1")
    assert not (tmp_path / "absent.duckdb").exists()


def test_store_open_with_other_settings_in_this_process(store):
    con = connect(store)
    try:
        with pytest.raises(StoreError, match="other settings"):
            run_sql(store, "SELECT 1")
    finally:
        con.close()


def _sample() -> SqlResult:
    return SqlResult(
        columns=["id", "text", "raw", "x", "when", "vec", "d"],
        rows=[
            (1, "é\nnext", b"\xc3\xa9", float("nan"), dt.datetime(2024, 1, 2, 3, 4, 5), [1.0, 2.5], Decimal("1.50")),
            (20, "a,b", b"\xc3", 2.0, None, None, Decimal("3")),
        ],
        truncated=True,
        elapsed_s=0.01,
    )


def test_records_are_json_ready():
    records = _sample().to_records()
    assert records[0] == {"id": 1, "text": "é\nnext", "raw": "é", "x": None, "when": "2024-01-02T03:04:05",
                          "vec": [1.0, 2.5], "d": 1.5}
    assert records[1]["raw"] == "0xc3" and records[1]["d"] == 3
    json.dumps(records, allow_nan=False)


def test_records_from_store(store):
    records = run_sql(store, "SELECT token_id, raw, 1.5::DECIMAL(4, 2) AS d, [1, 2]::FLOAT[2] AS v, {'a': 1} AS s, "
                             "uuid() AS u, INTERVAL 1 DAY AS i FROM vocab ORDER BY token_id").to_records()
    assert [r["raw"] for r in records] == ["é", "0xc3"]
    assert records[0]["d"] == 1.5 and records[0]["v"] == [1.0, 2.0] and records[0]["s"] == {"a": 1}
    json.dumps(records, allow_nan=False)


def test_json_rows_equal_the_per_value_walk(store):
    """The column-wise JSON fast path gives what `json_value` gives value by value, for every kind of column."""
    from geomap.store.sql_result import json_value

    sql = ("SELECT token_id, raw, text, 1.5::DECIMAL(4, 2) AS d, [1, 2]::FLOAT[2] AS v, {'a': 1} AS s, "
           "INTERVAL 1 DAY AS i, token_id > 3 AS b, NULL AS n, 'nan'::DOUBLE AS nan, [1.0, 'inf'::FLOAT] AS inf, "
           "[[0.5, NULL], NULL] AS nested, 2.5::FLOAT AS f, MAP {'k': 'nan'::DOUBLE} AS m, "
           "18446744073709551615::UBIGINT AS big, TIMESTAMP '2024-01-02 03:04:05' AS t FROM vocab ORDER BY token_id")
    result = run_sql(store, sql)
    walked = [[json_value(v) for v in row] for row in result.rows]
    fast = run_sql(store, sql).json_rows()
    assert json.dumps(fast, allow_nan=False) == json.dumps(walked, allow_nan=False)
    assert fast[0][9] is None and fast[0][10] == [1.0, None] and fast[0][13] == {"k": None}
    assert _sample().json_rows() == [[json_value(v) for v in row] for row in _sample().rows]


def test_formats():
    res = _sample()
    assert json.loads(res.format("json"))[1]["text"] == "a,b"
    rows = list(csv.reader(io.StringIO(res.format("csv"))))
    assert rows[0] == res.columns and rows[2][1] == "a,b" and rows[1][1] == "é\nnext" and rows[2][4] == ""
    table = res.format("table").splitlines()
    assert table[0].split() == res.columns
    assert table[1].replace(" ", "").strip("-") == ""
    assert table[2].startswith(" 1") and table[3].startswith("20")  # numbers right-aligned
    assert "é\\nnext" in table[2] and "NULL" in table[3]
    assert table[-1] == "(2 rows, truncated: more rows matched)"
    with pytest.raises(ValueError, match="table, csv, json"):
        res.format("xml")


def test_pandas_and_arrow(store):
    res = run_sql(store, "SELECT id, text, tags FROM prompts ORDER BY id")
    df = res.to_pandas()
    assert list(df.columns) == ["id", "text", "tags"] and df["text"].tolist() == ["hello world", "second"]
    table = res.to_arrow()
    assert isinstance(table, pa.Table) and table.column_names == ["id", "text", "tags"]
    assert table.column("tags").to_pylist() == [["a", "b"], []]
    empty = run_sql(store, "SELECT id FROM runs WHERE false")
    assert empty.to_pandas().empty and empty.to_arrow().num_rows == 0
    mixed = SqlResult(["m"], [(1,), ("a",), (None,)], False, 0.0).to_arrow()  # Arrow cannot type it: strings
    assert mixed.schema.field("m").type == pa.string() and mixed.column("m").to_pylist() == ["1", "a", None]


def test_a_whitespace_token_is_visible_in_a_table():
    from geomap.store.sql_result import SqlResult

    table = SqlResult(["token", "n"], [(" ", 1), ("\n\n", 2), (" coming", 3)]).format("table").splitlines()
    assert table[2].startswith("' '") and table[3].startswith("'\\n\\n'") and table[4].startswith(" coming")
    assert SqlResult(["token"], [(" ",)]).format("csv") == "token\n \n"  # data formats keep the value as it is


def test_point_queries_never_wake_the_watchdog_and_overlapping_ones_are_marked_shared(store, monkeypatch):
    from geomap.store import sql_budget

    ages = []  # at each look, the age of the oldest query watched
    real = sql_budget._Monitor._look
    monkeypatch.setattr(sql_budget._Monitor, "_look", lambda self, watches: (
        ages.append(max(time.perf_counter() - w.began for w in watches)), real(self, watches)))
    for _ in range(50):
        assert run_sql(store, "SELECT 1").rows == [(1,)]
    assert all(age >= sql_budget.GRACE_S for age in ages)  # it slept through every query younger than its grace

    start = time.perf_counter()
    first, second = (sql_budget.Watchdog(None, 5.0, 1 << 20, start, lambda: None, "same") for _ in range(2))
    apart = sql_budget.Watchdog(None, 5.0, 1 << 20, start, lambda: None, "other")
    with first, apart:
        assert not first.shared and not apart.shared
        with second:
            assert first.shared and second.shared and not apart.shared
    time.sleep(3 * sql_budget.GRACE_S)
    with pytest.raises(SqlTimeout):  # a query past its limit is still stopped: the watchdog wakes for it
        run_sql(store, "SELECT count(*) FROM range(100000000000) a", time_limit=0.2)

"""`store.sql_guard` on an in-memory DuckDB: what it reads from DuckDB's parse, and what it refuses because of it."""

from __future__ import annotations

import duckdb
import pytest

from geomap.store.sql_guard import NoStatement, Refused, TooBig, check, first_keyword

MB = 2**20


@pytest.fixture(scope="module")
def con():
    c = duckdb.connect()
    c.execute("CREATE TABLE states (id BIGINT, layer SMALLINT, vec FLOAT[4])")
    yield c
    c.close()


# ---- reading the parse ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sql, word", [
    ("SELECT 1", "SELECT"), ("  select 1", "SELECT"), ("/* DELETE */ INSERT INTO t VALUES (1)", "INSERT"),
    ("-- a comment\nCHECKPOINT", "CHECKPOINT"), ("", ""), ("FORCE CHECKPOINT", "FORCE")])
def test_first_keyword_skips_comments(sql, word):
    assert first_keyword(sql) == word


@pytest.mark.parametrize("sql", [
    "SELECT * FROM states", "FROM states", "WITH x AS (SELECT 1 AS a) SELECT * FROM x", "DESCRIBE states",
    "SHOW TABLES", "SUMMARIZE states", "EXPLAIN SELECT * FROM states", "PRAGMA show_tables",
    "CALL pragma_version()", "SELECT * FROM range(10)", "SELECT * FROM range(1000000000) LIMIT 3",
    "SELECT range(10)", "SELECT repeat('a', 10)", "SELECT * FROM duckdb_tables()",
    "WITH \"x.csv\" AS (SELECT 1 AS a) SELECT * FROM \"x.csv\"", "PIVOT states ON layer USING count(*)",
    "SELECT unnest([1, 2, 3])"])
def test_reading_statements_pass(con, sql):
    check(con, sql, 64 * MB)


# ---- the policy -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sql, says", [
    ("INSERT INTO states VALUES (1, 0, NULL)", "INSERT (an INSERT statement): it writes to the store"),
    ("/* SELECT */ DELETE FROM states", "DELETE (a DELETE statement)"),
    ("SET threads = 1", "changes a setting"),
    ("ATTACH 'other.duckdb'", "attaches a database"),
    ("COPY states TO 'out.csv'", "copies data to or from files"),
    ("BEGIN TRANSACTION", "controls transactions"),
    ("CHECKPOINT", "CHECKPOINT (a statement that acts on the database)"),
    ("FORCE CHECKPOINT", "FORCE CHECKPOINT"),
    ("PRAGMA threads = 1", "PRAGMA (a SET statement): it changes a setting"),
    ("PRAGMA enable_profiling", "PRAGMA enable_profiling: only reading pragmas run here"),
    ("SELECT 1; SELECT 2", "2 statements given"),
    ("SELECT * FROM read_csv('/etc/passwd')", "read_csv('/etc/passwd') reaches outside the store"),
    ("SELECT * FROM read_text('s.duckdb.wal')", "files cannot be read"),
    ("SELECT * FROM '/etc/passwd'", "FROM '/etc/passwd' reads a file"),
    ("SELECT * FROM 'states.parquet'", "reads a file"),
    ("SELECT * FROM query('SELECT 1')", "runs SQL given as text"),
    ("SELECT getenv('HOME')", "getenv(): it reads the environment"),
    ("SELECT nextval('s')", "changes a sequence"),
    ("EXPLAIN SELECT * FROM read_blob('x')", "reaches outside the store"),
    ("PIVOT (SELECT * FROM read_csv('x.csv')) ON a USING count(*)", "inside a PIVOT"),
    ("SELECT range(states.id) FROM states", "its bounds must be numeric constants"),
    ("SELECT repeat('a', layer) FROM states", "needs a constant size"),
])
def test_what_is_refused_and_why(con, sql, says):
    with pytest.raises(Refused) as refused:
        check(con, sql, 64 * MB)
    assert says in str(refused.value)
    assert not isinstance(refused.value, NoStatement)


@pytest.mark.parametrize("sql", ["SELECT range(1e9)", "SELECT repeat('ab', 1e12)", "SELECT lpad('x', 1e10, 'y')",
                                 "SELECT list_resize([1], 1e9)", "SELECT range(0, 1e9, 1)"])
def test_a_constant_beyond_the_budget_is_too_big(con, sql):
    with pytest.raises(TooBig, match="builds about"):
        check(con, sql, 64 * MB)


def test_the_budget_counts_the_batches_duckdb_builds_at_once(con):
    check(con, "SELECT repeat('a', 1000)", 64 * MB)  # 1 KB a value, a few MB for the batches: fine
    with pytest.raises(TooBig, match="batches of 2048 rows"):  # 1 MB a value passes alone, not 2 x 2048 at once
        check(con, "SELECT repeat('a', 1000000)", 64 * MB)


def test_no_statement_is_its_own_class(con):
    with pytest.raises(NoStatement, match="No SQL statement given"):
        check(con, "  -- nothing\n", 64 * MB)


def test_a_syntax_error_is_duckdbs_to_name_not_a_refusal(con):
    with pytest.raises(duckdb.ParserException, match="syntax error"):  # `run_sql` shows DuckDB's own message
        check(con, "SELECT FROM WHERE", 64 * MB)

"""`store.sql_facts` and `store.sql_guard` on an in-memory DuckDB: the facts read from DuckDB's parse, the policy on
hand-built facts, and what `check` refuses because of both."""

from __future__ import annotations

import duckdb
import pytest

from geomap.store.sql_facts import Call, Facts, QuotedSource, Table, TableFunction, analyze
from geomap.store.sql_guard import NoStatement, Refused, TooBig, check, first_keyword, judge

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


# ---- the analysis alone: facts from a parse, nothing judged --------------------------------------------------------

def test_facts_count_statements_and_stop_there(con):
    assert analyze(con, "SELECT 1; SELECT 2") == Facts(statements=2)
    assert analyze(con, "  -- nothing\n") == Facts(statements=0)


def test_facts_name_the_statement_and_its_real_first_keyword(con):
    facts = analyze(con, "/* SELECT */ DELETE FROM states")
    assert (facts.kind, facts.word, facts.items) == ("DELETE", "DELETE", ())
    assert analyze(con, "CHECKPOINT") == Facts(1, "CALL", "CHECKPOINT")  # parses as a CALL, is not read further
    assert analyze(con, "PRAGMA enable_profiling").pragma == "enable_profiling"
    assert analyze(con, "PRAGMA show_tables").pragma == "show_tables"


def test_facts_list_table_functions_with_their_path_and_their_arguments_calls(con):
    facts = analyze(con, "SELECT * FROM read_csv('/etc/passwd') JOIN range(repeat('a', 3)::INT) ON true")
    functions = [f for f in facts.items if isinstance(f, TableFunction)]
    assert [(f.name, f.literal) for f in functions] == [("read_csv", "/etc/passwd"), ("range", "a")]
    assert functions[0].source == "read_csv('/etc/passwd')"
    assert Call("repeat", ("a", 3.0)) in facts.items  # a call inside a table function's arguments is read too


def test_facts_tell_a_cte_from_a_table_and_keep_a_path_as_written(con):
    items = analyze(con, 'WITH "x.csv" AS (SELECT 1 AS a) SELECT * FROM "x.csv", states, \'/etc/passwd\'').items
    tables = [f for f in items if isinstance(f, Table)]
    assert Table("x.csv", cte=True) in tables and Table("states") in tables and Table("/etc/passwd") in tables


@pytest.mark.parametrize("sql, call", [
    ("SELECT range(1e9)", Call("range", (1e9,))), ("SELECT range(0, -5, -1)", Call("range", (0.0, -5.0, -1.0))),
    ("SELECT repeat([1, 2], 10)", Call("repeat", ([1.0, 2.0], 10.0))),
    ("SELECT repeat('a', layer) FROM states", Call("repeat", ("a", None))),
    ("SELECT getenv('HOME')", Call("getenv", ("HOME",)))])
def test_facts_carry_each_calls_constant_arguments(con, sql, call):
    assert call in analyze(con, sql).items


def test_facts_of_explain_and_call_are_those_of_the_statement_inside(con):
    explained = analyze(con, "EXPLAIN SELECT * FROM read_blob('x')").items
    assert TableFunction("read_blob", "x", "read_blob('x')") in explained
    assert [f.name for f in analyze(con, "CALL pragma_version()").items] == ["pragma_version"]


def test_facts_of_a_pivot_come_from_its_tokens(con):
    facts = analyze(con, "PIVOT (SELECT * FROM read_csv('x.csv')) ON a USING count(*)")
    assert facts.from_tokens and facts.kind == "MULTI"
    assert TableFunction("read_csv") in facts.items and Call("count") in facts.items
    assert QuotedSource("'t.csv'") in analyze(con, "PIVOT 't.csv' ON a USING count(*)").items


def test_a_statement_duckdb_will_not_serialise_keeps_its_message(con):
    facts = analyze(con, "EXPLAIN INSERT INTO states VALUES (1, 0, NULL)")
    assert (facts.kind, facts.items) == ("EXPLAIN", ()) and "SELECT statements" in facts.parse_error
    with pytest.raises(Refused, match="only a query"):
        check(con, "EXPLAIN INSERT INTO states VALUES (1, 0, NULL)", 64 * MB)


# ---- the policy alone: hand-built facts, no DuckDB ------------------------------------------------------------------

def _refusal(facts: Facts, budget: int = 64 * MB) -> str:
    with pytest.raises(Refused) as refused:
        judge(facts, budget)
    return str(refused.value)


@pytest.mark.parametrize("facts", [
    Facts(1, "SELECT", "SELECT", items=(TableFunction("range"), Table("states"), Table("x.csv", cte=True),
                                        Call("count"), Call("repeat", ("ab", 10.0)), Call("range", (5.0,)))),
    Facts(1, "PRAGMA", "PRAGMA", pragma="show_tables"),
    Facts(1, "CALL", "CALL", items=(TableFunction("pragma_version"),)),
    Facts(1, "SELECT", "SELECT", parse_error="syntax error at or near WHERE"),
    Facts(1, "MULTI", "PIVOT", items=(TableFunction("unnest"), Call("count")), from_tokens=True)])
def test_the_policy_passes_facts_of_reading(facts):
    judge(facts, 64 * MB)


@pytest.mark.parametrize("facts, says", [
    (Facts(0), "No SQL statement given"), (Facts(3), "3 statements given"),
    (Facts(1, "INSERT", "INSERT"), "INSERT (an INSERT statement): it writes to the store"),
    (Facts(1, "VACUUM", ""), "VACUUM (a VACUUM statement): it acts on the database (vacuum)"),
    (Facts(1, "PRAGMA", "PRAGMA", pragma="?"), "PRAGMA ?: only reading pragmas"),
    (Facts(1, "CALL", "FORCE"), "FORCE CHECKPOINT (a statement that acts on the database)"),
    (Facts(1, "SELECT", "SELECT", parse_error="Only SELECT statements can be serialized"), "only a query"),
    (Facts(1, "SELECT", "SELECT", items=(TableFunction("glob", "*"),)), "glob('*') reaches outside the store"),
    (Facts(1, "SELECT", "SELECT", items=(TableFunction("read_text", None, "read_text(p)"),)), "read_text(p) reaches"),
    (Facts(1, "SELECT", "SELECT", items=(TableFunction("query_table", "t"),)), "runs SQL given as text"),
    (Facts(1, "SELECT", "SELECT", items=(TableFunction("checkpoint"),)), "checkpoint() acts on the database"),
    (Facts(1, "SELECT", "SELECT", items=(Table("data/s.duckdb.wal"),)), "FROM 'data/s.duckdb.wal' reads a file"),
    (Facts(1, "SELECT", "SELECT", items=(Call("write_log", ("x",)),)), "write_log(): it writes to DuckDB's log"),
    (Facts(1, "SELECT", "SELECT", items=(Call("generate_series", (1.0, None)),)), "bounds must be numeric"),
    (Facts(1, "SELECT", "SELECT", items=(Call("lpad", ("x",)),)), "lpad(...) needs a constant size"),
    (Facts(1, "MULTI", "PIVOT", items=(Call("range"),), from_tokens=True), "range() inside a PIVOT"),
    (Facts(1, "MULTI", "PIVOT", items=(TableFunction("read_parquet"),), from_tokens=True), "inside a PIVOT"),
    (Facts(1, "MULTI", "PIVOT", items=(QuotedSource("'a.csv'"),), from_tokens=True), "FROM 'a.csv' reads a file")])
def test_the_policy_refuses_facts_with_todays_sentences(facts, says):
    assert says in _refusal(facts)


def test_the_policy_names_the_first_fact_in_the_parse_order():
    items = (Table("states"), Call("getenv", ("HOME",)), TableFunction("read_csv", "/etc/passwd"))
    assert "getenv()" in _refusal(Facts(1, "SELECT", "SELECT", items=items))
    assert "read_csv" in _refusal(Facts(1, "SELECT", "SELECT", items=items[::-1]))


def test_the_policy_sizes_amplifiers_from_their_constants():
    def call(*args):
        return Facts(1, "SELECT", "SELECT", items=(Call("repeat", args),))
    judge(call("a", 1000.0), 64 * MB)
    with pytest.raises(TooBig, match="batches of 2048 rows"):
        judge(call("a", 1e6), 64 * MB)
    with pytest.raises(TooBig, match="alone builds about"):
        judge(call([1.0, 2.0], 1e8), 64 * MB)  # a list of two repeated 1e8 times: 1.6 GB
    judge(call([1.0], 1000.0), 64 * MB)
    with pytest.raises(TooBig, match="alone builds about 76 MB"):  # 1e7 elements of 8 bytes
        judge(Facts(1, "SELECT", "SELECT", items=(Call("range", (0.0, 1e7)),)), 64 * MB)
    assert "numeric constants" in _refusal(Facts(1, "SELECT", "SELECT", items=(Call("range", (float("inf"),)),)))

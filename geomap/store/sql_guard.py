"""What user SQL may do, judged from the facts `geomap.store.sql_facts` reads in DuckDB's own parse.

User SQL reads the store's tables and views, and nothing else:

- exactly one statement, of a reading type; the refusal names the statement's real first keyword (DuckDB's
  tokenizer skips comments), with the right article ("an INSERT");
- no file at all: every table function must be on `TABLE_FUNCTIONS` (ranges, unnest, catalog introspection), so
  ``read_blob``, ``read_text``, ``glob``, ``read_csv``, ... are refused whatever path they name (the store's own file,
  its WAL and its ``.tmp`` folder included), and so are ``query()``/``query_table()``, which would run SQL that was
  never checked; a table named like a path (``FROM '/etc/passwd'``) is refused as a file read;
- nothing that acts on the database: ``CHECKPOINT``, ``FORCE CHECKPOINT`` and ``CALL checkpoint()`` parse as
  CALLs, and only reading PRAGMAs (`PRAGMAS`) run;
- no list or string whose size a constant sets beyond the memory budget (``range(1e9)``, ``repeat(s, 1e9)``,
  ``lpad``, ``list_resize``): DuckDB builds such a value in one step, outside its memory accounting, and cannot be
  interrupted while it does, so these are checked before the query runs. Their size arguments must be constants,
  and `VECTOR` × `THREADS` such values (the batches of rows computed at once) must fit in the budget too.
"""

from __future__ import annotations

import math
import re
from typing import Any

import duckdb

from geomap.errors import GeomapError
from geomap.store.sql_facts import Call, Facts, QuotedSource, Table, TableFunction, analyze, first_keyword

__all__ = ["AMPLIFIERS", "PRAGMAS", "READ_TYPES", "SCALAR_REFUSED", "TABLE_FUNCTIONS", "NoStatement", "Refused",
           "TooBig", "check", "first_keyword", "judge"]

READ_TYPES = {"SELECT", "EXPLAIN", "PRAGMA", "CALL", "MULTI"}  # MULTI: PIVOT
WHAT = {"SET": "changes a setting", "LOAD": "installs or loads an extension", "ATTACH": "attaches a database",
        "DETACH": "detaches a database", "COPY": "copies data to or from files", "EXPORT": "exports to files",
        "TRANSACTION": "controls transactions", "VACUUM": "acts on the database (vacuum)"}
TABLE_FUNCTIONS = frozenset({
    "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree", "summary",
    "test_all_types", "pg_timezone_names", "icu_calendar_names", "duckdb_columns", "duckdb_constraints",
    "duckdb_databases", "duckdb_dependencies", "duckdb_functions", "duckdb_indexes", "duckdb_keywords",
    "duckdb_schemas", "duckdb_sequences", "duckdb_settings", "duckdb_tables", "duckdb_types", "duckdb_views",
    "duckdb_memory", "duckdb_optimizers", "pragma_table_info", "pragma_show", "pragma_version", "pragma_collations",
    "pragma_platform", "pragma_database_size", "pragma_storage_info", "pragma_metadata_info"})
PRAGMAS = frozenset({"table_info", "show", "show_tables", "show_tables_expanded", "show_databases", "version",
                     "database_size", "storage_info", "functions", "collations", "platform", "metadata_info",
                     "database_list", "user_agent"})
SCALAR_REFUSED = {"write_log": "writes to DuckDB's log", "setval": "changes a sequence",
                  "nextval": "changes a sequence", "getenv": "reads the environment",
                  "json_execute_serialized_sql": "runs SQL that was not checked"}
VECTOR = 2048  # rows DuckDB computes at once: a value built per row is built this many times together
THREADS = 2  # and in as many batches at once as DuckDB has threads (geomap's stores use a few)
AMPLIFIERS = frozenset({"range", "generate_series", "repeat", "lpad", "rpad", "list_resize", "array_resize", "bar"})
_PATHLIKE = re.compile(r"[/\\*?~]|://|\.(csv|tsv|txt|json|jsonl|ndjson|parquet|gz|zst|duckdb|db|wal|tmp|xlsx|"
                       r"arrow|blob|bin|log)$", re.IGNORECASE)


class Refused(GeomapError):
    """Raised by `check`; `geomap.store.sql` turns it into its `SqlRefused`."""


class NoStatement(Refused):
    """The SQL holds no statement at all (an error of the user's text, not a refusal)."""


class TooBig(Refused):
    """A constant asks for a list or string beyond the memory budget."""


def _article(word: str) -> str:
    return "an" if word[:1].upper() in "AEIOU" else "a"


def check(con: duckdb.DuckDBPyConnection, sql: str, budget_bytes: int, budget_mb: float | None = None) -> None:
    """Refuse anything but one statement that reads the store's tables within the memory budget.

    Args:
        con: A connection to parse with.
        sql: The user's SQL.
        budget_bytes: The most one value built at once may take.
        budget_mb: The budget as the user knows it, for messages (default: ``budget_bytes`` in MB).

    Raises:
        Refused: With a sentence naming what was refused and why (`TooBig` for a constant beyond the budget).
    """
    judge(analyze(con, sql), budget_bytes, budget_mb)


def judge(facts: Facts, budget_bytes: int, budget_mb: float | None = None) -> None:
    """Refuse the statement whose facts these are unless it only reads the store's tables within the budget.

    Args:
        facts: What the statement does (`geomap.store.sql_facts.analyze`).
        budget_bytes: The most one value built at once may take.
        budget_mb: The budget as the user knows it, for messages (default: ``budget_bytes`` in MB).

    Raises:
        Refused: With a sentence naming the first thing refused and why (`TooBig` for a constant beyond the budget).
    """
    if not facts.statements:
        raise NoStatement("No SQL statement given.")
    if facts.statements > 1:
        raise Refused(f"{facts.statements} statements given; run one statement at a time.")
    kind, word = facts.kind, facts.word
    if kind not in READ_TYPES:
        what = WHAT.get(kind, "writes to the store")
        raise Refused(f"{word or kind} ({_article(kind)} {kind} statement): it {what}.")
    if kind == "PRAGMA":
        if facts.pragma not in PRAGMAS:
            raise Refused(f"PRAGMA {facts.pragma}: only reading pragmas run here ({', '.join(sorted(PRAGMAS))}); "
                          "this one changes a setting or acts on the database.")
        return
    if kind == "CALL" and word != "CALL":  # CHECKPOINT and FORCE CHECKPOINT parse as CALL too
        named = "FORCE CHECKPOINT" if word == "FORCE" else word
        raise Refused(f"{named} (a statement that acts on the database): store SQL only reads.")
    if facts.from_tokens:  # PIVOT: DuckDB cannot serialise it, so its calls were read from its tokens
        _judge_tokens(facts)
    elif facts.parse_error is not None:
        if "SELECT statements" in facts.parse_error:
            raise Refused("only a query (SELECT, FROM, WITH, DESCRIBE, SHOW, SUMMARIZE, PIVOT, EXPLAIN) runs here.")
        # else a syntax error: executing it gives DuckDB's own message
    else:
        _judge_parse(facts, budget_bytes, budget_mb if budget_mb is not None else budget_bytes / 2**20)


def _judge_parse(facts: Facts, budget_bytes: int, mb: float) -> None:
    """Refuse the first table function off the list, file-like table, refused call or amplifier beyond the budget."""
    for fact in facts.items:
        if isinstance(fact, TableFunction) and fact.name not in TABLE_FUNCTIONS:
            raise Refused(_file_message(fact))
        if isinstance(fact, Table) and not fact.cte and _PATHLIKE.search(fact.name):
            raise Refused(f"FROM '{fact.name}' reads a file, and files cannot be read: store SQL reaches the store's "
                          "tables and views only (SHOW TABLES lists them).")
        if isinstance(fact, Call) and fact.name in SCALAR_REFUSED:
            raise Refused(f"{fact.name}(): it {SCALAR_REFUSED[fact.name]}; store SQL only reads.")
        if isinstance(fact, Call) and fact.name in AMPLIFIERS:
            _bound(fact, budget_bytes, mb)


def _judge_tokens(facts: Facts) -> None:
    """Refuse a call of a table function off the list or of a refused or amplifying one, and a quoted source."""
    for fact in facts.items:
        if isinstance(fact, (TableFunction, Call)) and (
                (isinstance(fact, TableFunction) and fact.name not in TABLE_FUNCTIONS)
                or fact.name in SCALAR_REFUSED or fact.name in AMPLIFIERS):
            raise Refused(f"{fact.name}() inside a PIVOT: write the query as SELECT ... FROM (PIVOT ...) over the "
                          "store's tables, with no file, SQL-text or list-building function.")
        if isinstance(fact, QuotedSource):
            raise Refused(f"FROM {fact.text} reads a file, and files cannot be read: store SQL reaches the store's "
                          "tables and views only.")


def _file_message(fact: TableFunction) -> str:
    name, source = fact.name, fact.source
    what = f"{name}({fact.literal!r})" if isinstance(fact.literal, str) else (
        source if source and "(" in source else f"{name}()")
    if name in ("query", "query_table"):
        return f"{what} runs SQL given as text, which is not checked; write the query itself."
    if name in ("checkpoint", "force_checkpoint"):
        return f"{what} acts on the database (a checkpoint); store SQL only reads."
    return (f"{what} reaches outside the store: files cannot be read (not even the store's own files), only the "
            "store's tables and views.")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _bound(call: Call, budget: int, mb: float) -> None:
    """Refuse an amplifying call whose size is not a constant within the budget (8 bytes a list element)."""
    name, args = call.name, call.args
    sizes = [_number(a) for a in args]
    if name in ("range", "generate_series"):
        start, stop, step = ([0.0] + sizes + [1.0])[:3] if len(args) == 1 else (sizes + [1.0])[:3]
        if None in (start, stop, step) or not all(map(math.isfinite, (start, stop, step))):
            raise Refused(f"{name}(...) as a value builds a whole list at once, outside the memory budget "
                          f"({mb:g} MB), so its bounds must be numeric constants here; FROM {name}(...) streams "
                          "rows instead.")
        need = 8 * ((0.0 if step == 0 else max(0.0, (stop - start) / step)) + (name == "generate_series"))
    else:
        where = {"repeat": 1, "lpad": 1, "rpad": 1, "list_resize": 1, "array_resize": 1, "bar": 3}[name]
        size = sizes[where] if len(args) > where else (80.0 if name == "bar" else None)
        if size is None:
            raise Refused(f"{name}(...) needs a constant size here: it builds its value at once, outside the memory "
                          f"budget ({mb:g} MB).")
        base = args[0] if args else None
        unit = {"repeat": len(base) * (8 if isinstance(base, list) else 1) if isinstance(base, (str, list)) else 1024,
                "list_resize": 8, "array_resize": 8}.get(name, 4)
        need = max(size, 0.0) * max(unit, 1)
    if not math.isfinite(need) or need > budget:
        raise TooBig(f"{name}(...) alone builds about {need / 2**20:,.0f} MB at once")
    if need * VECTOR * THREADS > budget:
        raise TooBig(f"{name}(...) builds about {need / 2**10:,.0f} KB a value, "
                     f"{need * VECTOR * THREADS / 2**20:,.0f} MB for the {THREADS} batches of {VECTOR} rows DuckDB "
                     "computes at once")

"""What user SQL may do, decided from DuckDB's own parse before anything runs.

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

import json
import math
import re
from typing import Any

import duckdb

from geomap.errors import GeomapError

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
_AMPLIFIERS = {"range", "generate_series", "repeat", "lpad", "rpad", "list_resize", "array_resize", "bar"}
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


def first_keyword(sql: str) -> str:
    """The statement's first keyword or word, skipping comments (``/* DELETE */ INSERT ...`` gives ``INSERT``)."""
    try:
        tokens = duckdb.tokenize(sql)
    except Exception:  # noqa: BLE001 - a best effort for the message only
        tokens = []
    for position, kind in tokens:
        if kind.name != "comment":
            match = re.match(r"[A-Za-z_]+", sql[position:])
            return match.group(0).upper() if match else sql[position:position + 10]
    return ""


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
    statements = con.extract_statements(sql)
    if not statements:
        raise NoStatement("No SQL statement given.")
    if len(statements) > 1:
        raise Refused(f"{len(statements)} statements given; run one statement at a time.")
    statement = statements[0]
    kind, word = statement.type.name, first_keyword(statement.query)
    if kind not in READ_TYPES:
        what = WHAT.get(kind, "writes to the store")
        raise Refused(f"{word or kind} ({_article(kind)} {kind} statement): it {what}.")
    body = statement.query.strip().rstrip(";").strip()
    if kind == "PRAGMA":
        name = re.match(r"\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*pragma\s+([A-Za-z_]+)", body, re.I | re.S)
        pragma = name.group(1).lower() if name else "?"
        if pragma not in PRAGMAS:
            raise Refused(f"PRAGMA {pragma}: only reading pragmas run here ({', '.join(sorted(PRAGMAS))}); this one "
                          "changes a setting or acts on the database.")
        return
    if kind == "CALL":  # CHECKPOINT and FORCE CHECKPOINT parse as CALL too
        if word != "CALL":
            named = "FORCE CHECKPOINT" if word == "FORCE" else word
            raise Refused(f"{named} (a statement that acts on the database): store SQL only reads.")
        body = "FROM " + body[body.upper().index("CALL") + 4:]
    elif kind == "EXPLAIN":
        body = re.sub(r"^\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*explain\s+(?:analyze\s+)?", "", body, flags=re.I | re.S)
    elif kind == "MULTI":  # PIVOT: DuckDB cannot serialise it, so its function calls are read from its tokens
        _check_tokens(con, body)
        return
    _check_tree(con, body, budget_bytes, budget_mb)


def _check_tokens(con: duckdb.DuckDBPyConnection, body: str) -> None:
    """Refuse a statement by its tokens: a call of a table function off the list or of a refused or amplifying one.

    A quoted name after FROM or JOIN (a file) is refused too.
    """
    tables = {r[0] for r in con.execute("SELECT DISTINCT lower(function_name) FROM duckdb_functions() "
                                        "WHERE function_type = 'table'").fetchall()}
    words = []
    for position, kind in duckdb.tokenize(body):
        if kind.name == "comment":
            continue
        match = re.match(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|[A-Za-z_][A-Za-z_0-9]*|\S", body[position:])
        words.append((kind.name, match.group(0) if match else ""))
    for i, (kind, word) in enumerate(words):
        following = words[i + 1][1] if i + 1 < len(words) else ""
        name = word.strip('"').lower()
        if following == "(" and ((name in tables and name not in TABLE_FUNCTIONS) or name in SCALAR_REFUSED
                                 or name in _AMPLIFIERS):
            raise Refused(f"{name}() inside a PIVOT: write the query as SELECT ... FROM (PIVOT ...) over the store's "
                          "tables, with no file, SQL-text or list-building function.")
        previous = words[i - 1][1].upper() if i else ""
        if kind == "string_const" and previous in ("FROM", "JOIN", "PIVOT"):
            raise Refused(f"FROM {word} reads a file, and files cannot be read: store SQL reaches the store's "
                          "tables and views only.")


def _check_tree(con: duckdb.DuckDBPyConnection, body: str, budget_bytes: int, budget_mb: float | None) -> None:
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [body]).fetchall()[0][0])
    if tree.get("error"):
        if "SELECT statements" in str(tree.get("error_message")):
            raise Refused("only a query (SELECT, FROM, WITH, DESCRIBE, SHOW, SUMMARIZE, PIVOT, EXPLAIN) runs here.")
        return  # a syntax error: executing it gives DuckDB's own message
    _walk(tree, (budget_bytes, budget_mb if budget_mb is not None else budget_bytes / 2**20, body), set())


def _walk(node: Any, budget: tuple[int, float, str], ctes: set[str]) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, budget, ctes)
        return
    if not isinstance(node, dict):
        return
    cte_map = node.get("cte_map")
    if isinstance(cte_map, dict):
        ctes = ctes | {str(entry.get("key", "")).lower() for entry in cte_map.get("map", []) if isinstance(entry, dict)}
    if node.get("type") == "TABLE_FUNCTION":
        function = node.get("function") or {}
        name = str(function.get("function_name", "")).lower()
        if name not in TABLE_FUNCTIONS:
            raise Refused(_file_message(name, function, _source(node, budget[2])))
        _walk(function.get("arguments"), budget, ctes)
        return
    _check_node(node, budget, ctes)
    for value in node.values():
        _walk(value, budget, ctes)


def _check_node(node: dict, budget: tuple[int, float, str], ctes: set[str]) -> None:
    """Refuse a table named like a file, a refused function, or an amplifying call beyond the budget."""
    if node.get("type") == "BASE_TABLE":
        name = str(node.get("table_name", ""))
        if name.lower() not in ctes and _PATHLIKE.search(name):
            raise Refused(f"FROM '{name}' reads a file, and files cannot be read: store SQL reaches the store's "
                          "tables and views only (SHOW TABLES lists them).")
    if node.get("class") == "FUNCTION":
        name = str(node.get("function_name", "")).lower()
        if name in SCALAR_REFUSED:
            raise Refused(f"{name}(): it {SCALAR_REFUSED[name]}; store SQL only reads.")
        if name in _AMPLIFIERS:
            _bound(name, [_argument(a) for a in node.get("arguments") or []], budget)


def _argument(arg: Any) -> Any:
    return arg.get("expression", arg) if isinstance(arg, dict) and "expression" in arg else arg


def _source(node: dict, sql: str) -> str | None:
    """The text of a node in the SQL it was parsed from, when DuckDB kept its place."""
    start, length = node.get("query_location"), node.get("query_location_length")
    if isinstance(start, int) and isinstance(length, int) and 0 <= start < len(sql) and 0 < length <= 200:
        return sql[start:start + length].strip()
    return None


def _file_message(name: str, function: dict, source: str | None = None) -> str:
    literal = next((c for c in _constants(function)), None)
    what = f"{name}({literal!r})" if isinstance(literal, str) else (source if source and "(" in source else
                                                                   f"{name}()")
    if name in ("query", "query_table"):
        return f"{what} runs SQL given as text, which is not checked; write the query itself."
    if name in ("checkpoint", "force_checkpoint"):
        return f"{what} acts on the database (a checkpoint); store SQL only reads."
    return (f"{what} reaches outside the store: files cannot be read (not even the store's own files), only the "
            "store's tables and views.")


def _constants(node: Any):
    if isinstance(node, dict):
        if node.get("class") == "CONSTANT":
            yield (node.get("literal") or {}).get("text")
        for value in node.values():
            yield from _constants(value)
    elif isinstance(node, list):
        for item in node:
            yield from _constants(item)


def _value(node: Any) -> Any:
    """A constant expression's value (numbers, strings, list literals, casts and unary minus), else None."""
    if not isinstance(node, dict):
        return None
    cls = node.get("class")
    if cls == "CONSTANT":
        literal = node.get("literal") or {}
        text = literal.get("text")
        if literal.get("kind") == "STRING":
            return text
        try:
            return float(text)
        except (TypeError, ValueError):
            return None
    if cls == "CAST":
        return _value(node.get("child"))
    if cls == "FUNCTION":
        args = [_argument(a) for a in node.get("arguments") or []]
        if node.get("function_name") == "-" and len(args) == 1:
            inner = _value(args[0])
            return -inner if isinstance(inner, float) else None
        if node.get("function_name") == "list_value":
            return [_value(a) for a in args]
    return None


def _number(node: Any) -> float | None:
    value = _value(node)
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


def _bound(name: str, args: list, limits: tuple[int, float, str]) -> None:
    """Refuse an amplifying call whose size is not a constant within the budget (8 bytes a list element)."""
    budget, mb = limits[:2]
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
        base = _value(args[0]) if args else None
        unit = {"repeat": len(base) * (8 if isinstance(base, list) else 1) if isinstance(base, (str, list)) else 1024,
                "list_resize": 8, "array_resize": 8}.get(name, 4)
        need = max(size, 0.0) * max(unit, 1)
    if not math.isfinite(need) or need > budget:
        raise TooBig(f"{name}(...) alone builds about {need / 2**20:,.0f} MB at once")
    if need * VECTOR * THREADS > budget:
        raise TooBig(f"{name}(...) builds about {need / 2**10:,.0f} KB a value, "
                     f"{need * VECTOR * THREADS / 2**20:,.0f} MB for the {THREADS} batches of {VECTOR} rows DuckDB "
                     "computes at once")

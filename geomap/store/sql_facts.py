"""What a statement of user SQL does, read from DuckDB's own parse as plain facts, judging nothing.

`analyze` turns SQL into `Facts`: how many statements, the statement's type and real first keyword, the PRAGMA it
names, and, in the order DuckDB's parse (``json_serialize_sql``) holds them, every table function called
(`TableFunction`), table named (`Table`) and function called with the constant values of its arguments (`Call`).
A PIVOT, which DuckDB cannot serialise, is read from its tokens instead (`Facts.from_tokens`), and a quoted name
after FROM, JOIN or PIVOT there is a `QuotedSource`. `geomap.store.sql_guard` judges the facts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import duckdb

TREE_TYPES = frozenset({"SELECT", "EXPLAIN", "CALL"})  # the statement types whose body DuckDB serialises


@dataclass(frozen=True)
class TableFunction:
    """A table function called (``FROM read_csv('x')``).

    Attributes:
        name: Its name, lower-case.
        literal: The text of the first constant among its arguments (a path, for a file reader), if any.
        source: The call's own text in the SQL, when DuckDB kept its place.
    """

    name: str
    literal: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Table:
    """A table or view named (``FROM states``, ``FROM '/etc/passwd'``).

    Attributes:
        name: The name as written.
        cte: Whether the name is one of the statement's own common table expressions.
    """

    name: str
    cte: bool = False


@dataclass(frozen=True)
class Call:
    """A function called in an expression.

    Attributes:
        name: Its name, lower-case.
        args: Each argument's constant value (a float, a string or a list of them), None where not a constant.
    """

    name: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class QuotedSource:
    """A quoted name after FROM, JOIN or PIVOT in a statement read from its tokens (``FROM 'x.csv'``)."""

    text: str


Fact = TableFunction | Table | Call | QuotedSource


@dataclass(frozen=True)
class Facts:
    """What one piece of user SQL does.

    Attributes:
        statements: How many statements the SQL holds (the rest is read only when it holds exactly one).
        kind: The statement's type as DuckDB names it (``SELECT``, ``INSERT``, ``CALL``, ``MULTI`` for a PIVOT...).
        word: The statement's real first keyword, comments skipped (``CHECKPOINT`` parses as a CALL).
        pragma: The name a PRAGMA statement gives, lower-case (``?`` when none is found); None for other statements.
        parse_error: DuckDB's message when it would not serialise the statement's body.
        items: Table functions, tables and calls, in the order of the parse.
        from_tokens: Whether ``items`` were read from the tokens (a PIVOT) rather than from the parse.
    """

    statements: int
    kind: str = ""
    word: str = ""
    pragma: str | None = None
    parse_error: str | None = None
    items: tuple[Fact, ...] = ()
    from_tokens: bool = False


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


def analyze(con: duckdb.DuckDBPyConnection, sql: str) -> Facts:
    """The facts of user SQL, from DuckDB's parse on ``con``; nothing runs.

    Args:
        con: A connection to parse with.
        sql: The user's SQL.

    Returns:
        The facts; only ``statements`` when the SQL does not hold exactly one statement.

    Raises:
        duckdb.ParserException: The SQL does not parse (DuckDB's own message).
    """
    statements = con.extract_statements(sql)
    if len(statements) != 1:
        return Facts(statements=len(statements))
    statement = statements[0]
    kind, word = statement.type.name, first_keyword(statement.query)
    body = statement.query.strip().rstrip(";").strip()
    if kind == "PRAGMA":
        name = re.match(r"\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*pragma\s+([A-Za-z_]+)", body, re.I | re.S)
        return Facts(1, kind, word, pragma=name.group(1).lower() if name else "?")
    if kind == "MULTI":
        return Facts(1, kind, word, items=tuple(_token_facts(con, body)), from_tokens=True)
    if kind not in TREE_TYPES or (kind == "CALL" and word != "CALL"):  # CHECKPOINT parses as a CALL
        return Facts(1, kind, word)
    if kind == "CALL":
        body = "FROM " + body[body.upper().index("CALL") + 4:]
    elif kind == "EXPLAIN":
        body = re.sub(r"^\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*explain\s+(?:analyze\s+)?", "", body, flags=re.I | re.S)
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [body]).fetchall()[0][0])
    if tree.get("error"):
        return Facts(1, kind, word, parse_error=str(tree.get("error_message")))
    return Facts(1, kind, word, items=tuple(_tree_facts(tree, body, set())))


def _token_facts(con: duckdb.DuckDBPyConnection, body: str) -> Iterator[Fact]:
    """Calls (a table function when DuckDB has one of that name) and quoted sources, from the tokens."""
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
        if following == "(":
            yield TableFunction(name) if name in tables else Call(name)
        previous = words[i - 1][1].upper() if i else ""
        if kind == "string_const" and previous in ("FROM", "JOIN", "PIVOT"):
            yield QuotedSource(word)


def _tree_facts(node: Any, sql: str, ctes: set[str]) -> Iterator[Fact]:
    """Table functions, tables and calls of a serialised parse, depth first (a table function's arguments only)."""
    if isinstance(node, list):
        for item in node:
            yield from _tree_facts(item, sql, ctes)
        return
    if not isinstance(node, dict):
        return
    cte_map = node.get("cte_map")
    if isinstance(cte_map, dict):
        ctes = ctes | {str(entry.get("key", "")).lower() for entry in cte_map.get("map", []) if isinstance(entry, dict)}
    if node.get("type") == "TABLE_FUNCTION":
        function = node.get("function") or {}
        yield TableFunction(str(function.get("function_name", "")).lower(), next(_constants(function), None),
                            _source(node, sql))
        yield from _tree_facts(function.get("arguments"), sql, ctes)
        return
    if node.get("type") == "BASE_TABLE":
        name = str(node.get("table_name", ""))
        yield Table(name, name.lower() in ctes)
    if node.get("class") == "FUNCTION":
        yield Call(str(node.get("function_name", "")).lower(),
                   tuple(_value(_argument(a)) for a in node.get("arguments") or []))
    for value in node.values():
        yield from _tree_facts(value, sql, ctes)


def _argument(arg: Any) -> Any:
    return arg.get("expression", arg) if isinstance(arg, dict) and "expression" in arg else arg


def _source(node: dict, sql: str) -> str | None:
    """The text of a node in the SQL it was parsed from, when DuckDB kept its place."""
    start, length = node.get("query_location"), node.get("query_location_length")
    if isinstance(start, int) and isinstance(length, int) and 0 <= start < len(sql) and 0 < length <= 200:
        return sql[start:start + length].strip()
    return None


def _constants(node: Any) -> Iterator[Any]:
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

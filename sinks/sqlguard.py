"""What an analyst's SQL may do, judged on ClickHouse's own parse of it (pure logic).

:mod:`sinks.query` asks ClickHouse for three things and hands them here:

1. ``formatQuery(sql)``, with the SQL bound as a parameter: one statement, or a syntax
   error; its canonical text (no comments, identifiers escaped) is what runs afterwards,
   and it must not hold ``INTO OUTFILE`` outside quotes.
2. ``EXPLAIN AST`` of that text (parsing only, nothing runs): the statement must be a
   SELECT (with WITH, UNION, INTERSECT, EXCEPT, subqueries) or a DESCRIBE, with no
   ``INTO OUTFILE``, ``FORMAT`` or ``SETTINGS`` clause, no table function outside
   :data:`TABLE_FUNCTIONS` and none of the functions in :data:`DENIED_FUNCTIONS`.
3. ``EXPLAIN QUERY TREE`` (the analyzer: CTEs, aliases and ``IN table`` resolved to
   tables), asked only once 2 passed (the analyzer itself honours ``INTO OUTFILE``): every
   table must be one the caller may read.

The checks read EXPLAIN's lines without trusting their layout beyond what ClickHouse
escapes: an alias may hold a newline and add a line of its own, which can only add
something to refuse, never hide a node ClickHouse printed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from forecast.errors import QueryRejected

TABLE_FUNCTIONS = frozenset(
    {"numbers", "numbers_mt", "zeros", "zeros_mt", "generate_series", "generateseries", "values"}
)
"""Table functions an analyst may call (lower case): generators that read nothing."""

DENIED_FUNCTIONS = frozenset(
    {
        "file",
        "joinget",
        "joingetornull",
        "hascolumnintable",
        "catboostevaluate",
        "naivebayesclassifier",
        "getmacro",
        "getclienthttpheader",
        "getsetting",
        "getsettingordefault",
        "getserversetting",
        "getmergetreesetting",
        "currentprofiles",
        "enabledprofiles",
        "currentroles",
        "enabledroles",
        "defaultroles",
    }
)
"""Ordinary functions that read files, other tables or server configuration."""

DENIED_PREFIXES = ("dict", "filesystem")
"""Function families denied by name: dictionaries and the server's disks."""

STATEMENTS = {"SelectWithUnionQuery": "select", "DescribeQuery": "describe"}

_NODE = re.compile(r"^( *)(\w+)(?: (\S+))?")
_TABLE = re.compile(r"^\s*TABLE id: \d+, .*?table_name: ([^,]*)(?:, .*)?$")
_TABLE_FUNCTION = re.compile(
    r"^\s*TABLE_FUNCTION id: \d+, .*?table_function_name: ([^,]*)(?:, .*)?$"
)
_QUOTED = re.compile(r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.)*\"|`(?:[^`\\]|\\.)*`", re.S)
_INTO_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.I)
_FUNCTION = re.compile(r"^\s*FUNCTION id: \d+, function_name: ([^,]*),")


@dataclass(frozen=True, slots=True)
class Node:
    depth: int
    kind: str
    name: str  # the first word after the kind: a function's, table's or format's name


def nodes(ast_lines: Iterable[str]) -> list[Node]:
    """The lines of ``EXPLAIN AST`` as nodes: the indent, the kind, and the first word
    after it, which ClickHouse prints escaped (an alias follows it raw, and may hold a
    newline: the rest of the line is never read, and a line an alias adds can only be
    refused too)."""
    out = []
    for line in ast_lines:
        match = _NODE.match(line)
        if match is not None:
            out.append(Node(len(match.group(1)), match.group(2), match.group(3) or ""))
    return out


def check_text(canonical: str) -> None:
    """``INTO OUTFILE`` in ClickHouse's canonical text of the query, outside its quoted
    literals and identifiers (``EXPLAIN AST`` leaves the clause out of some unions, so the
    text is read too)."""
    if _INTO_OUTFILE.search(_QUOTED.sub(" ", canonical)):
        raise QueryRejected("INTO OUTFILE is not allowed", code="sql_into_outfile")


def check_identifiers(canonical: str) -> None:
    """No quoted identifier with an escape or a control character: ClickHouse's dumps
    (``EXPLAIN AST``, ``EXPLAIN QUERY TREE``) print identifiers raw, so a line break in
    an alias splits a node's line, and a table read behind it went unseen."""
    for token in _QUOTED.findall(canonical):
        if token[0] in '`"' and ("\\" in token or any(c < " " for c in token)):
            raise QueryRejected(
                "quoted identifiers with escapes or control characters are not allowed",
                code="sql_identifier",
            )


def check_ast(ast_lines: Iterable[str], table_functions: Iterable[str]) -> str:
    """``select`` or ``describe``, or QueryRejected naming what is refused.

    ``table_functions`` are the server's own (``system.table_functions``), so a name that
    is both a table function and an ordinary function (``file``) is judged as the former.
    """
    parsed = nodes(ast_lines)
    if not parsed or parsed[0].depth != 0:
        raise QueryRejected("the query could not be read", code="sql_syntax")
    kind = STATEMENTS.get(parsed[0].kind)
    if kind is None:
        raise QueryRejected(
            f"only SELECT and DESCRIBE queries are allowed, not {parsed[0].kind}",
            code="sql_not_select",
        )
    known_table_functions = {name.lower() for name in table_functions}
    for node in parsed[1:]:
        if node.depth == 1 and node.kind == "Literal":
            raise QueryRejected("INTO OUTFILE is not allowed", code="sql_into_outfile")
        if node.depth == 1 and node.kind == "Identifier" and node.name != "Native":
            raise QueryRejected(f"FORMAT {node.name} is not allowed", code="sql_format")
        if node.kind == "Set":
            raise QueryRejected("SETTINGS in a query are not allowed", code="sql_settings")
        if node.kind == "Function":
            _check_function(node.name, known_table_functions)
    return kind


def _check_function(name: str, known_table_functions: set[str]) -> None:
    lowered = name.lower()
    if lowered in known_table_functions and lowered not in TABLE_FUNCTIONS:
        raise _table_function(name)
    if lowered in DENIED_FUNCTIONS or lowered.startswith(DENIED_PREFIXES):
        raise QueryRejected(f"function {name}() is not allowed", code="sql_function")


def described_tables(ast_lines: Iterable[str]) -> list[str]:
    """The tables a DESCRIBE names."""
    return [node.name for node in nodes(ast_lines) if node.kind == "TableIdentifier"]


def check_tree(tree_lines: Iterable[str], readable: frozenset[str]) -> None:
    """The resolved query (``EXPLAIN QUERY TREE``): its tables must be readable, its table
    functions allowed, and no denied function may have been resolved either."""
    tables, table_functions = [], []
    lines = list(tree_lines)
    if not lines or not lines[0].startswith(("QUERY id:", "UNION id:")):
        raise QueryRejected("the query could not be analysed", code="sql_syntax")
    for line in lines:
        if (match := _TABLE.match(line)) is not None:
            tables.append(match.group(1))
        elif (match := _TABLE_FUNCTION.match(line)) is not None:
            table_functions.append(match.group(1))
        elif (match := _FUNCTION.match(line)) is not None:
            _check_function(match.group(1), set())
    check_tables(tables, table_functions, readable)


def check_tables(tables: Iterable[str], functions: Iterable[str], readable: frozenset[str]) -> None:
    """Every table (and parameterised view, which the tree shows as a table function)
    must be in ``readable``; other table functions must be allowed generators."""
    for table in tables:
        if table not in readable:
            raise QueryRejected(f"table {table} is not readable here", code="sql_table")
    for function in functions:
        if "." in function:
            if function not in readable:
                raise QueryRejected(f"view {function} is not readable here", code="sql_table")
        elif function.lower() not in TABLE_FUNCTIONS:
            raise _table_function(function)


def _table_function(name: str) -> QueryRejected:
    allowed = ", ".join(sorted(TABLE_FUNCTIONS))
    return QueryRejected(
        f"table function {name}() is not allowed; allowed: {allowed}", code="sql_table_function"
    )

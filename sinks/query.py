"""Read-only SQL for analysts: one statement, read-only by construction, bounded.

Two locks: a statement check (one statement; SELECT, WITH, SHOW, DESCRIBE, EXPLAIN or
EXISTS) and ClickHouse's own ``readonly`` setting, plus row and time limits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from forecast.errors import QueryRejected
from sinks.clickhouse import Store

READ_VERBS = ("select", "with", "show", "describe", "desc", "explain", "exists")
_STRINGS_AND_COMMENTS = re.compile(
    r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`(?:[^`\\]|\\.)*`|--[^\n]*|/\*.*?\*/", re.S
)


@dataclass(slots=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple]
    truncated: bool

    def to_json(self) -> dict:
        return {
            "columns": self.columns,
            "rows": [list(r) for r in self.rows],
            "truncated": self.truncated,
        }


def check_readonly(sql: str) -> str:
    """Return the single statement without a trailing ``;`` or raise QueryRejected."""
    statement = sql.strip().rstrip(";").strip()
    if not statement:
        raise QueryRejected("empty query")
    bare = _STRINGS_AND_COMMENTS.sub(" ", statement)
    if ";" in bare:
        raise QueryRejected("only one statement is allowed")
    first = bare.split(None, 1)[0].lower() if bare.split() else ""
    if first not in READ_VERBS:
        raise QueryRejected(f"only read queries are allowed ({', '.join(READ_VERBS)})")
    return statement


def readonly_settings(**limits: object) -> dict:
    """The limits, then ``readonly = 1`` last (chDB applies settings one by one, and once
    read-only nothing else may be set). It also refuses SETTINGS in the query itself."""
    return {**limits, "readonly": 1}


def run_readonly(
    store: Store, sql: str, max_rows: int = 10_000, timeout: float = 30.0
) -> QueryResult:
    """Run an analyst query with ClickHouse's readonly mode and row/time limits."""
    statement = check_readonly(sql)
    with store.analyst_session() as session:
        columns, rows = session.query_with_columns(
            statement,
            readonly_settings(
                max_execution_time=timeout,
                max_result_rows=max_rows + 1,
                result_overflow_mode="break",
            ),
        )
    return QueryResult(columns, rows[:max_rows], len(rows) > max_rows)

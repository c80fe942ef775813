"""Analyst SQL: judged by ClickHouse's own parser, run read-only, capped, and scoped.

A query passes :mod:`sinks.sqlguard` (one SELECT or DESCRIBE; no ``INTO OUTFILE``,
``FORMAT`` or ``SETTINGS``; only generator table functions; only the tables of
:data:`ANALYST_TABLES`), then runs in a session of its own with every cap of
:class:`QueryLimits` and ``readonly = 1`` last (so neither the query nor anything it calls
may change a setting). A caller scoped to sensor patterns reads every table through
ClickHouse's ``additional_table_filters``, which apply wherever the table is read: in a
view, a subquery, a join or ``IN``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from forecast.errors import QueryError, QueryRejected
from forecast.settings import Settings
from sinks.clickhouse import READ_SETTINGS, Store
from sinks.schema import DATABASE, LOG_TABLES
from sinks.sqlguard import (
    check_ast,
    check_identifiers,
    check_tables,
    check_text,
    check_tree,
    described_tables,
)

MAX_SQL_BYTES = 64 * 1024
SENSOR_VIEWS = (
    "readings",
    "predictions",
    "prediction_steps",
    "drift_events",
    "forecast_errors",
    "drift_timeline",
)
"""The engine's tables and views that hold sensor rows (readable by scoped callers)."""
PARAMETERISED_VIEWS = ("model_leaderboard",)
GLOBAL_TABLES = ("model_decisions",)
"""Readable only by callers who see every sensor."""
SYSTEM_TABLES = ("one", "numbers", "numbers_mt", "zeros", "zeros_mt", "functions")
LISTED_SYSTEM_TABLES = ("tables", "columns")
"""System tables shown only as far as the caller's own readable tables go."""
SCOPE_PATTERN = re.compile(r"^[A-Za-z0-9_.:*?-]{1,200}$")
LIMIT_ERRORS = {
    "MEMORY_LIMIT_EXCEEDED": "memory",
    "TOO_MANY_BYTES": "bytes read",
    "TOO_MANY_ROWS": "rows read",
    "TOO_MANY_ROWS_OR_BYTES": "result size",
    "TIMEOUT_EXCEEDED": "time",
    "TOO_SLOW": "time",
}


@dataclass(frozen=True, slots=True)
class QueryLimits:
    """What one analyst query may spend; ClickHouse enforces each, readonly keeps them."""

    max_rows: int = 10_000
    timeout: float = 30.0
    max_memory: int = 512 << 20
    max_bytes_read: int = 8 << 30
    max_result_bytes: int = 64 << 20

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: object) -> QueryLimits:
        limits = cls(
            settings.query_max_rows,
            settings.query_timeout,
            settings.query_max_memory,
            settings.query_max_bytes_read,
            settings.query_max_result_bytes,
        )
        return cls(**{**_fields(limits), **overrides})

    def settings(self) -> dict[str, object]:
        return {
            "max_execution_time": self.timeout,
            "max_memory_usage": self.max_memory,
            "max_bytes_to_read": self.max_bytes_read,
            "max_result_rows": self.max_rows + 1,
            "max_result_bytes": self.max_result_bytes,
            "result_overflow_mode": "break",
        }


def _fields(limits: QueryLimits) -> dict[str, object]:
    return {name: getattr(limits, name) for name in QueryLimits.__slots__}


@dataclass(frozen=True, slots=True)
class Access:
    """The sensors a caller may read: glob patterns (``*`` and ``?``); none if empty."""

    scopes: tuple[str, ...] = ("*",)

    @property
    def everything(self) -> bool:
        return "*" in self.scopes

    @property
    def engine_tables(self) -> tuple[str, ...]:
        return SENSOR_VIEWS + PARAMETERISED_VIEWS + (GLOBAL_TABLES if self.everything else ())

    @property
    def readable(self) -> frozenset[str]:
        names = [f"{DATABASE}.{t}" for t in self.engine_tables]
        names += [f"system.{t}" for t in SYSTEM_TABLES + LISTED_SYSTEM_TABLES]
        return frozenset(names)

    def table_filters(self) -> str:
        """``additional_table_filters``: the caller's sensors in every table of rows, and
        only the readable tables in ``system.tables`` and ``system.columns``."""
        listed = ", ".join(_literal(t) for t in self.engine_tables)
        filters = {
            "system.tables": f"database = {_literal(DATABASE)} AND name IN ({listed})",
            "system.columns": f"database = {_literal(DATABASE)} AND table IN ({listed})",
        }
        if not self.everything:
            sensors = self.sensor_filter()
            for table in LOG_TABLES.values():
                filters[f"{DATABASE}.{table}"] = sensors
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in filters.items()) + "}"

    def sensor_filter(self) -> str:
        """A ClickHouse condition on ``sensor_id`` that holds for the caller's sensors."""
        for scope in self.scopes:
            if not SCOPE_PATTERN.match(scope):
                raise QueryRejected(
                    f"scope {scope[:60]!r} cannot be applied to SQL", code="forbidden"
                )
        if not self.scopes:
            return "0"
        likes = [f"sensor_id LIKE {_literal(glob_to_like(scope))}" for scope in self.scopes]
        return "(" + " OR ".join(likes) + ")"


def glob_to_like(pattern: str) -> str:
    """``ETTh1.*`` to ``ETTh1.%`` (LIKE's own wildcards in the pattern are escaped)."""
    out = []
    for char in pattern:
        if char in "%_\\":
            out.append("\\" + char)
        elif char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        else:
            out.append(char)
    return "".join(out)


def _literal(text: str) -> str:
    """A ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


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


def session_settings(limits: QueryLimits, access: Access) -> dict[str, object]:
    """Everything an analyst session runs with, ``readonly = 1`` last (chDB applies
    settings one by one, and once read-only nothing else may be set)."""
    return {
        **READ_SETTINGS,
        **limits.settings(),
        "additional_table_filters": access.table_filters(),
        "readonly": 1,
    }


def checked(session: Store, sql: str, access: Access, settings: dict) -> str:
    """The canonical text of ``sql`` once ClickHouse's parser has judged it allowed."""
    if len(sql.encode()) > MAX_SQL_BYTES:
        raise QueryRejected(f"the query is over {MAX_SQL_BYTES} bytes", code="sql_too_long")
    statement = sql.strip().rstrip(";").strip()
    if not statement:
        raise QueryRejected("empty query", code="sql_syntax")
    canonical = _parse(session, "SELECT formatQuery({sql:String})", {"sql": statement})[0]
    check_text(canonical)
    ast = _parse(session, f"EXPLAIN AST {canonical}")
    table_functions = session.parse("SELECT name FROM system.table_functions")
    kind = check_ast(ast, table_functions)
    if kind == "describe":
        check_tables(described_tables(ast), [], access.readable)
        check_identifiers(canonical)
        return canonical
    try:
        tree = [
            row[0] for row in session.query(f"EXPLAIN QUERY TREE {canonical}", settings=settings)
        ]
    except QueryError as exc:
        raise _query_error(exc) from None
    check_tree(tree, access.readable)
    check_identifiers(canonical)
    return canonical


def _parse(session: Store, sql: str, parameters: dict | None = None) -> list[str]:
    """Parsing only, with no settings: a SETTINGS clause in the AST is the caller's."""
    try:
        return session.parse(sql, parameters)
    except QueryError as exc:
        raise QueryRejected(_clickhouse_message(exc.message), code="sql_syntax") from None


def run_readonly(
    store: Store, sql: str, limits: QueryLimits | None = None, access: Access | None = None
) -> QueryResult:
    """Judge, then run an analyst query; QueryRejected before it runs, QueryError after."""
    limits = limits or QueryLimits()
    access = access or Access()
    settings = session_settings(limits, access)
    with store.analyst_session() as session:
        canonical = checked(session, sql, access, settings)
        try:
            columns, rows = session.query_with_columns(canonical, settings)
        except QueryError as exc:
            raise _query_error(exc) from None
    return QueryResult(columns, rows[: limits.max_rows], len(rows) > limits.max_rows)


def stream_readonly(
    store: Store, sql: str, params: dict, fmt: str, settings: dict
) -> Iterator[bytes]:
    """Run engine-built SQL (an export) in an analyst session, chunk by chunk."""
    with store.analyst_session() as session:
        try:
            yield from session.raw_stream(sql, params, fmt, settings)
        except QueryError as exc:
            raise _query_error(exc) from None


def _query_error(exc: QueryError) -> QueryError:
    """A ClickHouse refusal as the analyst should read it: which cap tripped, if one did."""
    for name, what in LIMIT_ERRORS.items():
        if f"({name})" in exc.message:
            return QueryError(
                f"the query went past its {what} limit: {_clickhouse_message(exc.message)}",
                code="query_limit",
            )
    if "(READONLY)" in exc.message:
        return QueryRejected(_clickhouse_message(exc.message), code="sql_settings")
    return QueryError(_clickhouse_message(exc.message))


def _clickhouse_message(text: str) -> str:
    """ClickHouse's own sentence, without the driver's wrapping and stack."""
    match = re.search(
        r"DB::Exception: (.*?)(?: \(version [\d.]+\))?(?: \([A-Z_]+\))?\.?$", text, re.S
    )
    message = match.group(1) if match else text
    return message.replace("DB::Exception: ", "").strip()[:500]

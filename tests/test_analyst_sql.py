"""Analyst SQL against real chDB: what ClickHouse's parser lets through, the caps, scopes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecast.errors import QueryError, QueryRejected
from forecast.schemas import Prediction, Reading
from sinks.clickhouse import Store
from sinks.export import ExportRequest, export
from sinks.query import Access, QueryLimits, run_readonly
from sinks.sqlguard import check_ast, nodes

pytestmark = pytest.mark.integration

T0 = 1467331200.0  # 2016-07-01T00:00:00Z
SENSORS = ("scope.a1", "scope.a2", "scope.b1")


@pytest.fixture(scope="module")
def rows(store: Store) -> Store:
    """Three sensors, each with readings and one-step-ahead predictions."""
    readings = [Reading(s, T0 + 3600 * i, float(i)) for s in SENSORS for i in range(6)]
    predictions = [
        Prediction(s, T0 + 3600 * i, time.time(), "scoped", 1, 3600.0, [i + 1.0], [i], [i + 2.0], i)
        for s in SENSORS
        for i in range(5)
    ]
    store.write_batch(readings, predictions, token="scope-rows")
    return store


def refused(store: Store, sql: str, code: str | None = None, **kwargs: object) -> QueryRejected:
    with pytest.raises(QueryRejected) as caught:
        run_readonly(store, sql, **kwargs)
    if code is not None:
        assert caught.value.code == code, caught.value.message
    return caught.value


# -- statements that must be refused before they run ---------------------------------------


HOSTILE = [
    ("SELECT 'x' AS x INTO OUTFILE '{out}' APPEND", "sql_into_outfile"),
    ("select 1 into outfile '{out}' truncate", "sql_into_outfile"),
    ("SELECT * FROM (SELECT 1) INTO OUTFILE '{out}' AND STDOUT", "sql_into_outfile"),
    ("SELECT 1 UNION ALL SELECT 2 INTO OUTFILE '{out}'", "sql_into_outfile"),
    ("WITH x AS (SELECT 1) SELECT * FROM x INTO OUTFILE '{out}' FORMAT CSV", "sql_into_outfile"),
    ("SELECT 1 /* */ INTO/**/OUTFILE '{out}'", "sql_into_outfile"),
    ("SELECT * FROM file('{out}', 'CSV', 'x String')", "sql_table_function"),
    ("SELECT file('/etc/hostname')", "sql_table_function"),
    ("SELECT file('/etc/hostname') AS `a\nb`", "sql_table_function"),
    ("SELECT dictGet('d', 'x', 1) AS `a) (children 1)\n  Function lower`", "sql_function"),
    ("SELECT * FROM url('http://127.0.0.1:9/', 'CSV', 'x String')", "sql_table_function"),
    ("SELECT * FROM remote('127.0.0.1', system.one)", "sql_table_function"),
    ("SELECT * FROM executable('id', 'TSV', 'x String')", "sql_table_function"),
    ("SELECT * FROM merge('forecast', '.*')", "sql_table_function"),
    ("SELECT * FROM loop(forecast.readings)", "sql_table_function"),
    ("SELECT * FROM python('x')", "sql_table_function"),
    ("SELECT * FROM numbers(1) WHERE 1 IN (SELECT 1 FROM s3('http://127.0.0.1:9/x'))", None),
    ("SELECT * FROM system.processes", "sql_table"),
    ("SELECT query FROM system.query_log", None),
    ("SELECT * FROM system.users", "sql_table"),
    ("SELECT 1 WHERE 1 IN (SELECT 1 FROM system.processes)", "sql_table"),
    ("WITH p AS (SELECT * FROM system.processes) SELECT * FROM p", "sql_table"),
    ("SELECT * FROM system.one AS a JOIN system.settings AS b ON 1 = 1", "sql_table"),
    ("SELECT count() FROM forecast.readings_log", "sql_table"),
    ("SELECT count() FROM forecast.schema_migrations", "sql_table"),
    ("DESCRIBE forecast.predictions_log", "sql_table"),
    ("SELECT dictGet('d', 'x', 1)", "sql_function"),
    ("SELECT joinGet('forecast.readings', 'value', 'a')", "sql_function"),
    ("SELECT getSetting('max_memory_usage')", "sql_function"),
    # a line break in an alias split the tree's line of the table behind it
    ("SELECT (SELECT count() FROM (SELECT 1 FROM system.processes AS `a\nb`))", "sql_identifier"),
    ("SELECT 1 SETTINGS readonly = 0", "sql_settings"),
    ("SELECT 1 SETTINGS max_memory_usage = 0", "sql_settings"),
    ("SELECT * FROM (SELECT 1 SETTINGS max_result_rows = 0)", "sql_settings"),
    ("SELECT 1 FORMAT JSON", "sql_format"),
    ("SHOW PROCESSLIST", "sql_not_select"),
    ("SHOW TABLES", "sql_not_select"),
    ("EXPLAIN SELECT 1", "sql_not_select"),
    ("INSERT INTO forecast.readings_log SELECT * FROM forecast.readings_log", "sql_not_select"),
    ("TRUNCATE TABLE forecast.readings_log", "sql_not_select"),
    ("DROP TABLE forecast.readings", "sql_not_select"),
    ("ALTER TABLE forecast.readings_log DELETE WHERE 1", "sql_not_select"),
    ("SET readonly = 0", "sql_not_select"),
    ("SYSTEM SHUTDOWN", "sql_not_select"),
    ("SELECT 1; DROP TABLE forecast.readings", "sql_syntax"),
    ("SELECT 1 /* unterminated", "sql_syntax"),
    ("", "sql_syntax"),
    ("SELECT '" + "x" * 70_000 + "'", "sql_too_long"),
]


@pytest.mark.parametrize(("sql", "code"), HOSTILE)
def test_hostile_statements_are_refused_before_they_run(
    store: Store, tmp_path: Path, sql: str, code: str | None
) -> None:
    out = tmp_path / "written"
    with pytest.raises(QueryError) as caught:  # QueryRejected, or ClickHouse refusing
        run_readonly(store, sql.format(out=out))
    if code is not None:
        assert isinstance(caught.value, QueryRejected)
        assert caught.value.code == code, caught.value.message
    assert not out.exists()


WRAPS = [
    "{q}",
    "SELECT * FROM ({q})",
    "SELECT 1 UNION ALL {q}",
    "{q} UNION DISTINCT SELECT 1",
    "WITH w AS ({q}) SELECT * FROM w",
    "SELECT * FROM numbers(2) WHERE number IN ({q})",
    "SELECT * FROM numbers(1) AS n JOIN ({q}) AS j ON 1 = 1",
    "SELECT (SELECT count() FROM ({q}))",
    "SELECT 1 EXCEPT {q}",
]
FORBIDDEN = [
    "SELECT * FROM file('{out}')",
    "SELECT * FROM FILE('{out}', 'CSV', 'x String')",
    "SELECT * FROM url('http://127.0.0.1:9/')",
    "SELECT * FROM remote('127.0.0.1', 'system', 'one')",
    "SELECT * FROM executable('id', 'TSV', 'x String')",
    "SELECT * FROM merge('forecast', 'readings_log')",
    "SELECT 1 FROM system.processes",
    "SELECT 1 FROM system.users",
    "SELECT 1 FROM forecast.readings_log",
    "SELECT file('{out}')",
]


def _obfuscate(sql: str, cases: list[bool], noise: list[str]) -> str:
    words = sql.split(" ")
    out = []
    for i, word in enumerate(words):
        flip = cases[i % len(cases)]
        is_keyword = word.isalpha() and word.upper() in {"SELECT", "FROM", "WHERE", "UNION"}
        out.append(word.swapcase() if flip and is_keyword else word)
        out.append(noise[i % len(noise)])
    return "".join(out)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    wrap=st.sampled_from(WRAPS),
    inner=st.sampled_from(FORBIDDEN),
    outfile=st.booleans(),
    alias=st.sampled_from(["", " AS `a\nb`", " AS `x) (children 1)\n Literal 1`", ' AS "q"']),
    cases=st.lists(st.booleans(), min_size=1, max_size=8),
    noise=st.lists(
        st.sampled_from([" ", "  ", "\n", "\t", " /* SELECT 1 */ ", " -- ; comment\n"]),
        min_size=1,
        max_size=8,
    ),
)
def test_forbidden_reads_and_files_are_refused_however_they_are_wrapped(
    store: Store,
    tmp_path: Path,
    wrap: str,
    inner: str,
    outfile: bool,
    alias: str,
    cases: list[bool],
    noise: list[str],
) -> None:
    out = tmp_path / "wrapped"
    sql = wrap.format(q=inner.format(out=out) + alias)
    if outfile:
        sql += f" INTO OUTFILE '{out}.2' APPEND"
    with pytest.raises(QueryError):
        run_readonly(store, _obfuscate(sql, cases, noise))
    assert not out.exists() and not Path(f"{out}.2").exists()


def test_an_alias_holding_a_newline_cannot_hide_a_node() -> None:
    # What EXPLAIN AST prints for `SELECT file('x') AS \`a\nb\``: the alias follows the
    # name raw, newline and all.
    lines = [
        "SelectWithUnionQuery (children 2)",
        " ExpressionList (children 1)",
        "  SelectQuery (children 1)",
        "   ExpressionList (children 1)",
        "    Function file (alias a",
        "b) (children 1)",
        "     ExpressionList (children 1)",
        "      Literal 'x'",
        " Identifier Native",
    ]
    assert [(n.kind, n.name) for n in nodes(lines) if n.kind == "Function"] == [
        ("Function", "file")
    ]
    with pytest.raises(QueryRejected, match="file"):
        check_ast(lines, ["file"])


# -- what analysts may do -----------------------------------------------------------------


def test_analysts_read_the_views_system_helpers_and_describe(rows: Store) -> None:
    assert run_readonly(rows, "SELECT count() FROM forecast.readings").rows[0][0] >= 18
    assert run_readonly(rows, "select 1;").rows == [(1,)]
    assert run_readonly(rows, "SELECT ';' AS s -- trailing; comment").rows == [(";",)]
    described = run_readonly(rows, "DESCRIBE forecast.predictions")
    assert "sensor_id" in [r[0] for r in described.rows]
    tables = {r[0] for r in run_readonly(rows, "SELECT name FROM system.tables").rows}
    assert {"readings", "predictions", "forecast_errors", "model_decisions"} <= tables
    assert not {t for t in tables if t.endswith("_log")} and "processes" not in tables
    cte = run_readonly(
        rows,
        "WITH r AS (SELECT sensor_id, value FROM forecast.readings) "
        "SELECT count() FROM r WHERE sensor_id IN (SELECT sensor_id FROM forecast.predictions)",
    )
    assert cte.rows[0][0] >= 18


def test_caps_trip_and_say_which(rows: Store) -> None:
    with pytest.raises(QueryError, match="memory limit") as memory:
        run_readonly(
            rows,
            "SELECT length(groupArray(number)) FROM numbers(30000000)",
            QueryLimits(max_memory=64 << 20),
        )
    assert memory.value.code == "query_limit"
    with pytest.raises(QueryError, match="bytes read limit"):
        run_readonly(
            rows, "SELECT sum(number) FROM numbers(10000000)", QueryLimits(max_bytes_read=1 << 20)
        )
    started = time.monotonic()
    with pytest.raises(QueryError, match="time limit"):
        run_readonly(
            rows,
            "SELECT count() FROM numbers_mt(1000000000000) WHERE sipHash64(number) = 1",
            QueryLimits(timeout=0.5, max_bytes_read=1 << 60),
        )
    assert time.monotonic() - started < 10
    capped = run_readonly(rows, "SELECT number FROM numbers(50)", QueryLimits(max_rows=7))
    assert (len(capped.rows), capped.truncated) == (7, True)


def test_a_scoped_analyst_sees_only_its_sensors_on_every_path(rows: Store) -> None:
    scoped = Access(("scope.a*",))

    def sensors(sql: str) -> set[str]:
        return {r[0] for r in run_readonly(rows, sql, access=scoped).rows if r[0]}

    mine = {"scope.a1", "scope.a2"}
    for table in ("readings", "predictions", "forecast_errors"):
        assert sensors(f"SELECT DISTINCT sensor_id FROM forecast.{table}") <= mine
        assert sensors(f"SELECT DISTINCT sensor_id FROM forecast.{table}") == mine
    assert (
        sensors("SELECT 'scope.b1' IN (SELECT sensor_id FROM forecast.readings) ? 'leak' : ''")
        == set()
    )
    joined = sensors(
        "SELECT r.sensor_id FROM forecast.readings AS r "
        "JOIN forecast.predictions AS p ON r.sensor_id = p.sensor_id"
    )
    assert joined == mine
    board = run_readonly(
        rows,
        "SELECT sensors FROM forecast.model_leaderboard(start = '2016-07-01', stop = '2016-07-02')"
        " WHERE model = 'scoped'",
        access=scoped,
    )
    assert board.rows == [(2,)]
    refused(rows, "SELECT * FROM forecast.model_decisions", "sql_table", access=scoped)
    nothing = Access(())
    assert run_readonly(rows, "SELECT count() FROM forecast.readings", access=nothing).rows == [
        (0,)
    ]
    refused(rows, "SELECT 1", "forbidden", access=Access(("x' OR 1 --",)))
    csv = b"".join(export(rows, ExportRequest("predictions", "scope.*", None, None, "csv"), scoped))
    exported = {line.split(",")[0].strip('"') for line in csv.decode().splitlines()[1:]}
    assert exported == mine


def test_exports_over_their_cap_are_refused_before_they_start(rows: Store) -> None:
    with pytest.raises(QueryError) as caught:
        export(rows, ExportRequest("predictions", "scope.*", None, None, "csv"), max_rows=3)
    assert caught.value.code == "export_too_large"


def test_the_sink_stays_writable_after_refused_and_capped_queries(rows: Store) -> None:
    refused(rows, "SELECT 1 SETTINGS readonly = 0")
    with pytest.raises(QueryError):
        run_readonly(
            rows,
            "SELECT length(groupArray(number)) FROM numbers(30000000)",
            QueryLimits(max_memory=64 << 20),
        )
    rows.write_batch([Reading("scope.after", T0, 1.0)], [], token="scope-after")
    assert rows.query("SELECT count() FROM forecast.readings WHERE sensor_id = 'scope.after'") == [
        (1,)
    ]


def test_the_server_profile_parses(store: Store) -> None:
    """deploy/clickhouse/analyst.sql, statement by statement, through ClickHouse's parser."""
    text = (Path(__file__).parents[1] / "deploy" / "clickhouse" / "analyst.sql").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    statements = [s.strip() for s in code.split(";") if s.strip()]
    assert len(statements) == 3
    policy = next(line for line in text.splitlines() if "CREATE ROW POLICY" in line)
    for statement in [*statements, policy.removeprefix("--").strip()]:
        formatted = store.parse("SELECT formatQuery({sql:String})", {"sql": statement})[0]
        assert formatted.split()[0] in {"CREATE", "GRANT"}

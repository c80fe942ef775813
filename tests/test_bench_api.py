"""``forecast bench api``: a short run on a system it starts reports every scenario with
numbers; against a given URL whose routes fail, it counts the failures instead of
crashing. No speed is asserted (the budgets are printed by the bench)."""

from __future__ import annotations

import orjson
import pytest

from bench.api import SCENARIOS, Plan, Result, run, table
from forecast.schemas import Prediction
from gateway.auth import Authenticator, KeyStore
from gateway.http import ApiContext, HttpServer, create_app
from gateway.hub import Hub
from tests.conftest import base_env, run_cli

pytestmark = pytest.mark.integration


def test_a_short_run_reports_every_scenario_with_numbers(tmp_path) -> None:
    result = run_cli(
        "bench", "api", "--duration", "2", "--rate", "20", "--sensors", "5", "--scale", "0.1",
        "--json", env=base_env(tmp_path), timeout=150,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "latest:" in result.stderr and "in flight" in result.stderr  # progress lines
    report = orjson.loads(result.stdout)
    assert report["machine"].startswith("machine: ")
    assert report["command"].startswith("forecast bench api --duration 2")
    rows = {row["scenario"]: row for row in report["scenarios"]}
    assert list(rows) == list(SCENARIOS)
    for name, row in rows.items():
        assert row["due"] >= 1 and row["ok"] >= 1, row
        assert row["achieved_per_s"] > 0 and row["target_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], row
        assert row["budget_p95_ms"] == SCENARIOS[name].budget_ms
    assert rows["latest"]["statuses"].get("200", 0) >= 1


async def test_an_existing_api_whose_routes_fail_is_counted_not_crashed(tmp_path) -> None:
    keys = KeyStore(tmp_path / "keys.db")
    token = keys.create("viewer", "bench")[1]
    hub = Hub()
    p = Prediction("b.1", 1.7e9, 1.7e9, "baseline", 0, 60.0, [1.0], [0.0], [2.0], 1)
    hub.publish_prediction(p.to_message(), orjson.dumps(p.to_message()))
    ctx = ApiContext(auth=Authenticator(keys), hub=hub)  # no store: history and forecast 503
    server = HttpServer(create_app(ctx, rate="100000/minute"), "127.0.0.1", 0)
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        plan = Plan(list(SCENARIOS), 0.5, 1.0, 1, 0.05, url, token)
        lines: list[str] = []
        results = await run(plan, lines.append)
    finally:
        await server.stop()
    by_name = {r.scenario.name: r for r in results}
    assert by_name["latest"].ok == by_name["latest"].due >= 1
    for name in ("history", "forecast", "batch"):
        r = by_name[name]
        assert r.ok == 0 and r.due >= 1 and sum(r.statuses.values()) == r.due
        assert all(isinstance(s, int) and s >= 400 for s in r.statuses), r.statuses
    rendered = table(results)
    assert len(rendered) >= 1 + len(SCENARIOS)
    for name in ("history", "forecast", "batch"):
        row = next(line for line in rendered if line.startswith(name))
        assert "not met (errors)" in row or "no budget" in row
        assert f"x{by_name[name].due}" in row  # the status count, e.g. "503 x1"
    assert any(line.endswith("answered 2xx/304") for line in lines)


def test_the_table_says_when_the_budget_is_met_or_missed() -> None:
    fast, slow = Result(SCENARIOS["latest"], 500.0), Result(SCENARIOS["forecast"], 100.0)
    fast.due, fast.seconds, fast.latencies = 1000, 2.0, [0.002] * 1000
    slow.due, slow.seconds, slow.latencies = 200, 2.0, [0.2] * 200
    fast.statuses[200], slow.statuses[200] = 1000, 200
    rows = table([fast, slow])
    assert "p95 < 20 ms at 500/s: met" in rows[1] and "errors: none" in rows[1]
    assert "p95 < 50 ms at 100/s: missed" in rows[2]


def test_bad_options_are_one_line_errors(tmp_path) -> None:
    for args, said in (
        (["--scenarios", "latest,nope"], "--scenarios"),
        (["--key", "fk_x_y"], "--key goes with --url"),
    ):
        result = run_cli("bench", "api", *args, env=base_env(tmp_path), timeout=60)
        assert result.returncode != 0
        assert said in result.stderr and len(result.stderr.strip().splitlines()) == 1

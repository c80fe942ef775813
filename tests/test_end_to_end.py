"""Replay ETTh1 through the running system: websocket client and ClickHouse agree."""

from __future__ import annotations

import asyncio
import json

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from tests.conftest import ETTH1, System

pytestmark = pytest.mark.integration

ROWS = 200
SENSORS = ["ETTh1.OT", "ETTh1.HUFL"]


async def collect(ws, want: int, within: float = 90) -> list[dict]:
    got: list[dict] = []
    async with asyncio.timeout(within):
        while len(got) < want:
            message = orjson.loads(await ws.recv())
            if message["type"] == "prediction":
                got.append(message)
    return got


async def test_replayed_rows_reach_the_websocket_and_clickhouse(system: System) -> None:
    async with connect(f"{system.ws}?token={system.viewer_token}") as ws:
        await ws.send(json.dumps({"op": "subscribe", "sensors": SENSORS}))
        assert orjson.loads(await ws.recv()) == {"type": "subscribed", "sensors": sorted(SENSORS)}

        replay = await asyncio.to_thread(system.cli, "replay", str(ETTH1), "--limit", str(ROWS))
        assert replay.returncode == 0, replay.stderr
        assert f"replayed {ROWS * 7} readings" in replay.stdout

        # The first reading of a sensor only sets its step; every later one is forecast.
        predictions = await collect(ws, (ROWS - 1) * len(SENSORS))

    by_sensor = {s: [p for p in predictions if p["sensor_id"] == s] for s in SENSORS}
    for sensor, items in by_sensor.items():
        assert [p["seq"] for p in items] == list(range(1, ROWS)), sensor
        assert all(p["step_seconds"] == 3600.0 for p in items)
        assert all(len(p["yhat"]) == len(p["lower"]) == len(p["upper"]) == 24 for p in items)
        assert all(
            lo <= y <= hi
            for p in items
            for lo, y, hi in zip(p["lower"], p["yhat"], p["upper"], strict=True)
        )
    assert by_sensor["ETTh1.OT"][-1]["ts"] == "2016-07-09T07:00:00.000Z"  # row 200

    sql = (
        "SELECT sensor_id, count() AS n, uniqExact(seq) AS seqs FROM forecast.prediction_steps "
        "WHERE horizon = 1 AND sensor_id IN ('ETTh1.OT', 'ETTh1.HUFL') "
        "GROUP BY sensor_id ORDER BY sensor_id FORMAT"
    ).removesuffix(" FORMAT")
    result = await asyncio.to_thread(system.cli, "query", sql, "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows == [
        {"sensor_id": "ETTh1.HUFL", "n": ROWS - 1, "seqs": ROWS - 1},
        {"sensor_id": "ETTh1.OT", "n": ROWS - 1, "seqs": ROWS - 1},
    ]
    readings = await asyncio.to_thread(
        system.cli, "query", "SELECT count() FROM forecast.readings", "--format", "csv"
    )
    assert readings.stdout.splitlines() == ["count()", str(ROWS * 7)]


async def test_forecast_errors_view_joins_actuals(system: System) -> None:
    result = await asyncio.to_thread(
        system.cli,
        "query",
        "SELECT count() AS n, countIf(abs(error - (actual - yhat)) > 1e-9) AS bad "
        "FROM forecast.forecast_errors WHERE sensor_id = 'ETTh1.OT' AND horizon = 1",
        "--format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    # Each one-step forecast issued for rows 2..199 meets the actual of the next row.
    assert json.loads(result.stdout) == [{"n": ROWS - 2, "bad": 0}]


async def test_http_health_ready_metrics_and_auth(system: System) -> None:
    async with httpx.AsyncClient(base_url=system.http) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = (await client.get("/readyz")).json()
        checks = {"broker": True, "store": True, "sink": True, "model": True, "consuming": True}
        assert ready == {"ready": True, "checks": checks}
        metrics = (await client.get("/metrics")).text
        assert 'forecast_readings_total{reason="",result="accepted"}' in metrics
        anonymous = await client.get("/v1/sensors")
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "unauthorized"
        viewer = {"Authorization": f"Bearer {system.viewer_token}"}
        sensors = (await client.get("/v1/sensors", headers=viewer)).json()["sensors"]
        assert {s["sensor_id"] for s in sensors} >= set(SENSORS)
        forbidden = await client.post("/v1/query", json={"sql": "SELECT 1"}, headers=viewer)
        assert forbidden.status_code == 403
        assert (await client.get("/")).text.startswith("<!doctype html>")


async def test_websocket_rejects_missing_credentials_and_bad_messages(system: System) -> None:
    with pytest.raises(Exception, match="401"):
        async with connect(system.ws):
            pass
    async with connect(f"{system.ws}?token={system.viewer_token}") as ws:
        await ws.send("{not json")
        assert orjson.loads(await ws.recv())["code"] == "bad_json"
        await ws.send(json.dumps({"op": "dance"}))
        assert orjson.loads(await ws.recv())["code"] == "unknown_op"
        await ws.send(json.dumps({"op": "ping", "id": 7}))
        frame = await ws.recv()
        assert isinstance(frame, str)  # JSON goes in text frames (browsers need them)
        assert orjson.loads(frame) == {"type": "pong", "id": 7}


async def test_export_goes_through_the_running_engine(system: System, tmp_path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "errors.parquet"
    result = await asyncio.to_thread(
        system.cli,
        "export",
        "--what",
        "errors",
        "--sensors",
        "ETTh1.O?",
        "--from",
        "2016-07-02T00:00:00Z",
        "--to",
        "2016-07-03T00:00:00Z",
        "--format",
        "parquet",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out)
    assert set(table.column("sensor_id").to_pylist()) == {"ETTh1.OT"}
    assert table.num_rows > 0 and "actual" in table.column_names
    csv = await asyncio.to_thread(
        system.cli, "export", "--sensors", "ETTh1.HUFL", "--to", "2016-07-01T03:00:00Z"
    )
    lines = csv.stdout.splitlines()
    assert lines[0].startswith('"sensor_id","ts","target_ts","horizon"')
    assert len(lines) == 1 + 2 * 24  # readings at 01:00 and 02:00 were forecast
    async with httpx.AsyncClient(base_url=system.http) as client:
        viewer = {"Authorization": f"Bearer {system.viewer_token}"}
        assert (await client.get("/v1/export", headers=viewer)).status_code == 403


async def test_analyst_sql_over_http_is_judged_capped_and_scoped(system: System, tmp_path) -> None:
    made = await asyncio.to_thread(
        system.cli, "keys", "create", "--role", "analyst", "--scope", "ETTh1.OT"
    )
    assert made.returncode == 0, made.stderr
    token = next(w for w in made.stdout.split() if w.startswith("fk_"))
    scoped = {"Authorization": f"Bearer {token}"}
    out = tmp_path / "pwned.sh"
    async with httpx.AsyncClient(base_url=system.http, timeout=60) as client:

        async def sql(text: str) -> httpx.Response:
            return await client.post("/v1/query", json={"sql": text}, headers=scoped)

        seen = await sql("SELECT DISTINCT sensor_id FROM forecast.predictions")
        assert seen.status_code == 200, seen.text
        assert seen.json()["rows"] == [["ETTh1.OT"]]
        for text, code in [
            (f"SELECT 'echo pwned' AS x INTO OUTFILE '{out}' APPEND", "sql_into_outfile"),
            (f"SELECT * FROM file('{out}')", "sql_table_function"),
            ("SELECT query FROM system.processes", "sql_table"),
            ("SELECT * FROM forecast.readings_log", "sql_table"),
            ("SELECT 1 SETTINGS max_memory_usage = 0", "sql_settings"),
        ]:
            answer = await sql(text)
            assert answer.status_code == 400, text
            assert answer.json()["error"]["code"] == code, answer.text
            assert (
                code.removeprefix("sql_").split("_")[0] in answer.json()["error"]["message"].lower()
            )
        assert not out.exists()
        export = await client.get("/v1/export", params={"sensors": "*"}, headers=scoped)
        assert export.status_code == 200
        exported = {line.split(",")[0].strip('"') for line in export.text.splitlines()[1:]}
        assert exported == {"ETTh1.OT"}

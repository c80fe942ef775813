"""The push gateway: resume without gap or duplicate (memory and store), slow subscribers."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import ETTH1, System, start_system

pytestmark = pytest.mark.integration

OT = "ETTh1.OT"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    # Memory keeps only 20 predictions per sensor: longer gaps resume from ClickHouse.
    running = start_system(
        tmp_path_factory.mktemp("gateway"),
        FORECAST_REPLAY_BUFFER="20",
        FORECAST_WS_QUEUE_SIZE="300",
        FORECAST_RATE_HTTP="12/minute",
        FORECAST_RATE_WS_CONNECT="12/minute",
        FORECAST_RATE_WS_MESSAGES="5/second",
        FORECAST_CORS_ORIGINS="https://app.example",
    )
    yield running
    assert running.stop() == 0


async def replay(system: System, start: int, rows: int) -> None:
    result = await asyncio.to_thread(
        system.cli, "replay", str(ETTH1), "--start", str(start), "--limit", str(rows)
    )
    assert result.returncode == 0, result.stderr


async def predictions(ws, until_seq: int, sensor: str = OT, within: float = 60) -> list[dict]:
    got = []
    async with asyncio.timeout(within):
        while not got or got[-1]["seq"] < until_seq:
            message = orjson.loads(await ws.recv())
            if message["type"] == "prediction" and message["sensor_id"] == sensor:
                got.append(message)
    return got


async def test_resume_after_100_missed_predictions_without_gap_or_duplicate(
    gateway: System,
) -> None:
    url = f"{gateway.ws}?token={gateway.viewer_token}"
    async with connect(url) as steady:
        await steady.send(json.dumps({"op": "subscribe", "sensors": [OT]}))
        async with connect(url) as leaving:
            await leaving.send(json.dumps({"op": "subscribe", "sensors": [OT]}))
            await replay(gateway, 0, 50)
            before = await predictions(leaving, 49)
        assert [p["seq"] for p in before] == list(range(1, 50))
        await replay(gateway, 50, 100)  # 100 predictions pass while it is away
        everything = await predictions(steady, 149)  # seq 1..149, never disconnected
        async with connect(url) as back:
            await back.send(json.dumps({"op": "subscribe", "sensors": [OT], "since_seq": {OT: 49}}))
            assert orjson.loads(await back.recv())["type"] == "subscribed"
            resumed = await predictions(back, 149)
            await replay(gateway, 150, 5)  # then live, without a seam
            live = await predictions(back, 154)
    assert [p["seq"] for p in resumed] == list(range(50, 150))
    assert [p["seq"] for p in live] == list(range(150, 155))
    # 80 of them came back from ClickHouse, 20 from memory: all as they were published.
    for original, again in zip(everything[49:149], resumed, strict=True):
        assert again == original


async def test_a_stalled_subscriber_does_not_delay_the_others(gateway: System) -> None:
    url = f"{gateway.ws}?token={gateway.viewer_token}"
    host, port = gateway.ws.split("//")[1].split("/")[0].split(":")
    tiny = socket.socket()
    tiny.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
    tiny.connect((host, int(port)))
    async with httpx.AsyncClient(base_url=gateway.http) as http:
        latest = await http.get(
            f"/v1/sensors/{OT}/forecast",
            headers={"Authorization": f"Bearer {gateway.viewer_token}"},
        )
        last = latest.json()["seq"] if latest.status_code == 200 else 0
        target = last + 400 if last else 399  # a sensor's first reading only sets its step
        dropped_before = dropped((await http.get("/metrics")).text)
        async with connect(url) as fast, connect(url, sock=tiny, max_queue=1) as stalled:
            for ws in (fast, stalled):
                await ws.send(json.dumps({"op": "subscribe", "sensors": ["*"]}))
                assert orjson.loads(await ws.recv())["type"] == "subscribed"
            started = time.monotonic()
            # The fast one reads while the replay runs; the stalled one reads nothing.
            reading = asyncio.create_task(predictions(fast, target, within=60))
            await replay(gateway, 200, 400)
            got = await reading
            assert got[-1]["seq"] == target
            assert time.monotonic() - started < 60
            # The stalled one overflowed its queue and was dropped: with 1013 and an
            # error if it still read, cut off if it did not even read that for 5 s.
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(30):
                    while True:
                        await stalled.recv()
            assert closed.value.rcvd is None or closed.value.rcvd.code == 1013
        assert dropped((await http.get("/metrics")).text) > dropped_before


def dropped(metrics: str) -> float:
    line = next(
        line for line in metrics.splitlines() if line.startswith("forecast_ws_dropped_total ")
    )
    return float(line.split()[1])


async def test_http_rate_limit_answers_429_with_retry_after(gateway: System) -> None:
    viewer = {"Authorization": f"Bearer {gateway.viewer_token}", "X-Request-ID": "req-42"}
    async with httpx.AsyncClient(base_url=gateway.http) as http:
        answers = [await http.get("/v1/sensors", headers=viewer) for _ in range(13)]
        assert answers[0].status_code == 200
        assert answers[0].headers["x-request-id"] == "req-42"
        assert answers[0].headers["x-content-type-options"] == "nosniff"
        limited = answers[-1]
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
        assert (await http.get("/healthz")).status_code == 200  # probes are never limited
        cors = await http.options(
            "/v1/sensors",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
        )
        assert cors.headers["access-control-allow-origin"] == "https://app.example"
        other = await http.options(
            "/v1/sensors",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in other.headers


async def test_websocket_message_flood_is_closed_with_1008(gateway: System) -> None:
    async with connect(f"{gateway.ws}?token={gateway.viewer_token}") as ws:
        for i in range(10):
            await ws.send(json.dumps({"op": "ping", "id": i}))
        replies = []
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                while True:
                    replies.append(orjson.loads(await ws.recv()))
        assert closed.value.rcvd.code == 1008
        assert replies[-1]["code"] == "rate_limited"
        assert sum(r["type"] == "pong" for r in replies) == 5


async def test_websocket_connection_attempts_are_limited_per_address(gateway: System) -> None:
    from websockets.exceptions import InvalidStatus

    statuses = []
    for _ in range(14):
        try:
            async with connect(f"{gateway.ws}?token={gateway.viewer_token}"):
                statuses.append(101)
        except InvalidStatus as exc:
            statuses.append(exc.response.status_code)
    assert 429 in statuses


async def test_sigterm_closes_subscribers_with_1001_and_exits_cleanly(tmp_path) -> None:
    import signal

    system = start_system(tmp_path / "sigterm")
    try:
        async with connect(f"{system.ws}?token={system.viewer_token}") as ws:
            await ws.send(json.dumps({"op": "subscribe", "sensors": ["*"]}))
            assert orjson.loads(await ws.recv())["type"] == "subscribed"
            system.process.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(30):
                    await ws.recv()
            assert closed.value.rcvd.code == 1001
        assert await asyncio.to_thread(system.process.wait, 30) == 0
    finally:
        system.stop()

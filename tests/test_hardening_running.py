"""Gateway hardening against `forecast up` (a real process, real clients): half-sent
requests, oversized bodies, JWT rules and empty scopes, websocket frames that cannot be
echoed, key files, and a forged X-Forwarded-For (last: it spends the address's budget)."""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import Iterator

import httpx
import jwt
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import ETTH1, System, start_system

pytestmark = pytest.mark.integration

SECRET = "running-hardening-secret-0123456789abcdef"
ISSUER, AUDIENCE = "https://idp.example", "forecast"
RATE = 40


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    running = start_system(
        tmp_path_factory.mktemp("hardening"),
        FORECAST_HTTP_HEADER_TIMEOUT="1",
        FORECAST_HTTP_MAX_BODY="65536",
        FORECAST_RATE_HTTP=f"{RATE}/minute",
        FORECAST_RATE_WS_CONNECT="30/minute",
        FORECAST_JWT_SECRET=SECRET,
        FORECAST_JWT_ISSUER=ISSUER,
        FORECAST_JWT_AUDIENCE=AUDIENCE,
        FORECAST_JWT_MAX_TTL="3600",
    )
    yield running
    assert running.stop() == 0


def token(**claims: object) -> str:
    now = time.time()
    body = {"sub": "t", "role": "admin", "iat": now, "exp": now + 600, "iss": ISSUER}
    body |= {"aud": AUDIENCE, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, SECRET, algorithm="HS256")


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def host_port(system: System) -> tuple[str, int]:
    host, port = system.http.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def until_closed(reader: asyncio.StreamReader, within: float) -> tuple[bytes, float]:
    started = time.monotonic()
    async with asyncio.timeout(within):
        data = await reader.read()
    return data, time.monotonic() - started


async def test_300_half_sent_requests_are_closed_within_the_header_timeout(system) -> None:
    host, port = host_port(system)
    opened = [await asyncio.open_connection(host, port) for _ in range(300)]
    for _, writer in opened:
        writer.write(b"GET /v1/sensors HTTP/1.1\r\nHost: t\r\nX-Slow: ")
    ended = await asyncio.gather(*(until_closed(r, 6) for r, _ in opened))
    for _, writer in opened:
        writer.close()
    assert all(raw.startswith(b"HTTP/1.1 408") for raw, _ in ended)
    assert max(took for _, took in ended) < 1 + 3  # the timeout plus a margin
    async with httpx.AsyncClient() as client:  # and the server still serves
        assert (await client.get(f"{system.http}/healthz")).status_code == 200


async def test_bodies_over_the_cap_are_refused_on_the_query_route(system) -> None:
    host, port = host_port(system)
    analyst = token(role="analyst").encode()
    head = b"POST /v1/query HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + analyst + b"\r\n"
    # 50 MB announced: answered at once, nothing read.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head + b"Content-Length: 50000000\r\n\r\n")
    announced, _ = await until_closed(reader, 5)
    writer.close()
    # Chunked, past the 64 KiB cap: reading stops there.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
    for _ in range(17):  # 17 x 4 KiB = 68 KiB: the last chunk crosses the cap
        writer.write(b"1000\r\n" + b" " * 4096 + b"\r\n")
    streamed, _ = await until_closed(reader, 5)
    writer.close()
    for raw in (announced, streamed):
        assert raw.startswith(b"HTTP/1.1 413"), raw[:200]
        assert orjson.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_too_large"
    async with httpx.AsyncClient(base_url=system.http) as client:  # a small one still runs
        fine = await client.post(
            "/v1/query", json={"sql": "SELECT 1 AS one"}, headers=bearer(analyst.decode())
        )
    assert fine.status_code == 200, fine.text


@pytest.mark.parametrize(
    ("claims", "accepted"),
    [
        ({}, True),
        ({"exp": time.time() + 7200}, False),  # lives longer than FORECAST_JWT_MAX_TTL
        ({"iat": None}, False),
        ({"iss": "https://elsewhere.example"}, False),
        ({"aud": "another-service"}, False),
        ({"iss": None}, False),
    ],
)
async def test_jwt_rules_hold_over_http(system, claims, accepted) -> None:
    async with httpx.AsyncClient(base_url=system.http) as client:
        got = await client.get("/v1/models", headers=bearer(token(role="viewer", **claims)))
    assert got.status_code == (200 if accepted else 401), got.text


async def test_empty_scopes_see_nothing_over_http_and_websocket(system) -> None:
    replay = await asyncio.to_thread(system.cli, "replay", str(ETTH1), "--limit", "5")
    assert replay.returncode == 0, replay.stderr
    everything, nothing = token(role="viewer"), token(role="viewer", scopes=[])
    subscribe = orjson.dumps(
        {"op": "subscribe", "sensors": ["*"], "since_seq": {"ETTh1.OT": 0}}
    ).decode()
    async with (
        connect(f"{system.ws}?token={everything}") as seeing,
        connect(f"{system.ws}?token={nothing}") as blind,
    ):
        for ws in (seeing, blind):
            await ws.send(subscribe)
            assert orjson.loads(await ws.recv())["type"] == "subscribed"
        async with asyncio.timeout(60):  # what the all-sensors client gets, the other must not
            while True:
                message = orjson.loads(await seeing.recv())
                if message.get("sensor_id") == "ETTh1.OT" and message["seq"] >= 4:  # 0-based
                    break
        await blind.send('{"op": "ping", "id": "p"}')
        assert orjson.loads(await blind.recv()) == {"type": "pong", "id": "p"}
    async with httpx.AsyncClient(base_url=system.http) as client:
        seen = (await client.get("/v1/sensors", headers=bearer(everything))).json()["sensors"]
        hidden = (await client.get("/v1/sensors", headers=bearer(nothing))).json()["sensors"]
    assert "ETTh1.OT" in {s["sensor_id"] for s in seen} and hidden == []


async def test_a_ping_that_cannot_be_echoed_gets_an_error_frame(system) -> None:
    async with connect(f"{system.ws}?token={system.viewer_token}") as ws:
        await ws.send('{"op": "ping", "id": ' + "[" * 1000 + "]" * 1000 + "}")
        refused = orjson.loads(await ws.recv())
        await ws.send('{"op": ' + "[" * 1000 + "]" * 1000 + "}")
        unknown = orjson.loads(await ws.recv())
        await ws.send('{"op": "ping", "id": 7}')
        alive = orjson.loads(await ws.recv())
    assert (refused["type"], refused["code"]) == ("error", "bad_request")
    assert (unknown["type"], unknown["code"]) == ("error", "unknown_op")
    assert alive == {"type": "pong", "id": 7}


async def test_keys_file_is_private_and_comma_scopes_are_refused(system) -> None:
    made = await asyncio.to_thread(system.cli, "keys", "create", "--scope", "ETTh1.OT,ETTh2.*")
    assert made.returncode == 1 and "comma" in made.stderr
    async with httpx.AsyncClient(base_url=system.http) as client:
        refused = await client.post(
            "/v1/keys", json={"role": "viewer", "scopes": ["a,b"]}, headers=bearer(token())
        )
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "bad_scope"
    assert stat.S_IMODE((system.data_dir / "keys.db").stat().st_mode) == 0o600


async def test_zz_forged_forwarded_for_gets_no_fresh_budget(system) -> None:
    """Runs last: it spends this address's HTTP and websocket budgets."""
    async with httpx.AsyncClient(base_url=system.http) as client:
        codes = [(await client.get("/v1/sensors")).status_code for _ in range(RATE)]
        while codes[-1] != 429:
            assert len(codes) < 3 * RATE, "the rate limit never tripped"
            codes.append((await client.get("/v1/sensors")).status_code)
        for forged in ("203.0.113.9", "198.51.100.1, 203.0.113.10", "::1"):
            again = await client.get("/v1/sensors", headers={"X-Forwarded-For": forged})
            assert again.status_code == 429, forged

    async def opens(forwarded: str | None = None) -> int:
        headers = {"X-Forwarded-For": forwarded} if forwarded else None
        try:
            async with connect(
                f"{system.ws}?token={system.viewer_token}", additional_headers=headers
            ):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    statuses = [await opens()]
    while statuses[-1] != 429:
        assert len(statuses) < 90, "the connect rate never tripped"
        statuses.append(await opens())
    assert await opens("203.0.113.9") == 429

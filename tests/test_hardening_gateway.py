"""Gateway hardening, in-process but over real sockets: body caps, header and idle
timeouts, connection caps, trusted proxies, JWT rules, websocket frames that cannot be
echoed, key file modes and scopes with commas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from forecast.errors import AuthError, ConfigError
from forecast.logs import ContextFilter
from forecast.options import parse_networks
from forecast.settings import load_settings
from gateway.auth import Authenticator, JwtVerifier, KeyStore
from gateway.guards import BodyLimit
from gateway.http import ApiContext, HttpServer, create_app
from gateway.hub import Hub
from gateway.limits import client_address
from gateway.ws import StreamServer
from sinks import owner
from tests.conftest import base_env, run_cli

SECRET = "hardening-tests-secret-0123456789abcdef"
LOCAL = parse_networks("127.0.0.1")


def token(secret: str = SECRET, **claims: object) -> str:
    now = time.time()
    body = {"sub": "t", "role": "admin", "iat": now, "exp": now + 600, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, secret, algorithm="HS256")


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def auth(tmp_path: Path, **rules: object) -> Authenticator:
    verifier = JwtVerifier("HS256", SECRET, **rules)  # type: ignore[arg-type]
    return Authenticator(KeyStore(tmp_path / "keys.db"), jwt_verifier=verifier)


def hub_with(*sensors: str) -> Hub:
    hub = Hub()
    for seq, sensor in enumerate(sensors, 1):
        message = {"type": "prediction", "sensor_id": sensor, "seq": seq, "ts": "t", "model": "m"}
        hub.publish_prediction(message, orjson.dumps(message))
    return hub


@contextlib.asynccontextmanager
async def serving(ctx: ApiContext, app_options: dict | None = None, **server) -> AsyncIterator:
    """A real uvicorn server (HttpServer) on a free loopback port; yields its port."""
    http = HttpServer(create_app(ctx, **(app_options or {})), "127.0.0.1", 0, **server)
    await http.start()
    try:
        yield http.port
    finally:
        await http.stop()


def client_of(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}")


async def response(reader: asyncio.StreamReader, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        data = await reader.read()
    return data, time.monotonic() - started


def status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def body(raw: bytes) -> dict:
    return orjson.loads(raw.split(b"\r\n\r\n", 1)[1])


# -- request bodies -----------------------------------------------------------------------


async def test_content_length_over_the_cap_is_413_before_any_body_is_read(tmp_path) -> None:
    ctx = ApiContext(auth=auth(tmp_path))
    async with serving(ctx, {"max_body": 4096}) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/keys HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + token().encode() + b"\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )  # a gigabyte announced, not a byte of it sent: the answer cannot wait for it
        raw, _ = await response(reader, 5)
        writer.close()
    assert status(raw) == 413
    assert body(raw)["error"]["code"] == "body_too_large"
    assert b"x-request-id" in raw.lower() and b"nosniff" in raw  # the guard still ran


async def test_a_chunked_body_streaming_past_the_cap_is_413(tmp_path) -> None:
    ctx = ApiContext(auth=auth(tmp_path))
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(3):  # 3 x 4 KiB against a cap of 8 KiB
            sent += 4096
            yield b" " * 4096

    async with serving(ctx, {"max_body": 8192}) as port, client_of(port) as client:
        big = await client.post("/v1/keys", content=chunks(), headers=bearer(token()))
        small = await client.post(
            "/v1/keys",
            content=_once(b'{"role": "viewer", "scopes": ["a.*"]}'),
            headers=bearer(token()),
        )
    assert (big.status_code, big.json()["error"]["code"]) == (413, "body_too_large"), big.text
    assert small.status_code == 200, small.text  # chunked bodies under the cap still work


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_body_limit_stops_reading_at_the_cap() -> None:
    pulled = 0

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 1024, "more_body": pulled < 1000}

    async def app(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        raise AssertionError("read the whole body")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "headers": [(b"transfer-encoding", b"chunked")]}
    await BodyLimit(app, max_bytes=4096, timeout=5.0)(scope, receive, send)
    assert pulled == 5  # 4 KiB allowed; the fifth chunk went past it, nothing after
    assert sent[0]["status"] == 413
    assert orjson.loads(sent[1]["body"])["error"]["code"] == "body_too_large"


async def test_a_body_that_trickles_in_gets_408(tmp_path) -> None:
    ctx = ApiContext(auth=auth(tmp_path))
    async with serving(ctx, {"body_timeout": 0.5}) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/keys HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n"
            b"Authorization: Bearer " + token().encode() + b"\r\n\r\n" + b'{"role": '
        )
        raw, took = await response(reader, 5)
        writer.close()
    assert status(raw) == 408 and body(raw)["error"]["code"] == "body_timeout"
    assert 0.4 < took < 3


# -- connections: header timeout, keep-alive, cap -------------------------------------------


async def test_half_sent_requests_are_closed_after_the_header_timeout(tmp_path) -> None:
    ctx = ApiContext(auth=auth(tmp_path))
    async with serving(ctx, header_timeout=0.5) as port:
        half = [await asyncio.open_connection("127.0.0.1", port) for _ in range(100)]
        for _, writer in half:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # no blank line: never done
        silent = await asyncio.open_connection("127.0.0.1", port)
        trickle = await asyncio.open_connection("127.0.0.1", port)

        async def trickling() -> None:  # slowloris: a byte every 0.1 s never resets the clock
            with contextlib.suppress(ConnectionError):
                for byte in b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * 100:
                    trickle[1].write(bytes([byte]))
                    await trickle[1].drain()
                    await asyncio.sleep(0.1)

        trickler = asyncio.create_task(trickling())
        ended = await asyncio.gather(*(response(r, 8) for r, _ in [*half, silent, trickle]))
        trickler.cancel()
        # A complete request on a fresh connection is still served.
        async with httpx.AsyncClient() as client:
            fine = await client.get(f"http://127.0.0.1:{port}/healthz")
        for _, writer in [*half, silent, trickle]:
            writer.close()
    assert fine.status_code == 200
    # Closed within 5 s of a 0.5 s timeout (the machine may be loaded), before the 8 s wait.
    assert all(status(raw) == 408 and took < 5.0 for raw, took in ended[:100])
    assert body(ended[0][0])["error"]["code"] == "header_timeout"
    assert ended[100][0] == b"" and ended[100][1] < 5.0  # nothing sent: closed, no answer
    assert status(ended[101][0]) == 408 and ended[101][1] < 5.0


async def test_idle_keep_alive_connections_are_closed(tmp_path) -> None:
    ctx = ApiContext(auth=auth(tmp_path))
    async with serving(ctx, keep_alive=0.5, header_timeout=5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        answers = []
        for _ in range(2):  # the connection is reused within the keep-alive time
            writer.write(request)
            async with asyncio.timeout(5):
                answers.append(await reader.readuntil(b'{"status":"ok"}'))
        raw, took = await response(reader, 5)
        writer.close()
    assert all(status(a) == 200 for a in answers)
    assert raw == b"" and 0.3 < took < 2.5


async def test_connections_past_the_cap_are_refused_at_once(tmp_path) -> None:
    ctx = ApiContext(auth=auth(tmp_path))
    async with serving(ctx, max_connections=3, header_timeout=5) as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw, took = await response(reader, 3)
        writer.close()
        for _, w in held:
            w.close()
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient() as client:
            fine = await client.get(f"http://127.0.0.1:{port}/healthz")
    assert status(raw) == 503 and body(raw)["error"]["code"] == "too_many_connections"
    assert took < 1.0
    assert fine.status_code == 200  # freed slots are usable again


# -- request ids, security headers, rate limits, CORS ---------------------------------------


async def test_request_ids_headers_rate_limits_and_cors_in_process(tmp_path, caplog) -> None:
    ctx = ApiContext(auth=auth(tmp_path), hub=hub_with("a.1"))
    app = create_app(ctx, "3/minute", "https://app.example")
    caplog.handler.addFilter(ContextFilter())
    caplog.set_level(logging.INFO, logger="gateway.guards")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        asked = {**bearer(token()), "X-Request-ID": "req-42"}
        answers = [await client.get("/v1/sensors", headers=asked) for _ in range(4)]
        made_up = await client.get("/healthz", headers={"X-Request-ID": "no spaces allowed"})
        probes = [(await client.get(path)).status_code for path in ("/healthz", "/metrics")]
        allowed, other = [
            await client.options(
                "/v1/sensors",
                headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
            )
            for origin in ("https://app.example", "https://evil.example")
        ]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert all(a.headers["x-request-id"] == "req-42" for a in answers)
    assert all(a.headers["x-content-type-options"] == "nosniff" for a in answers)
    limited = answers[-1]
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert len(made_up.headers["x-request-id"]) == 32  # a new one
    assert probes == [200, 200]  # never limited
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers
    logged = [r for r in caplog.records if r.name == "gateway.guards"]
    assert [r.getMessage().split(" ")[:3] for r in logged[:4]] == [
        ["GET", "/v1/sensors", "200"]
    ] * 3 + [["GET", "/v1/sensors", "429"]]
    assert all(getattr(r, "request_id", None) == "req-42" for r in logged[:4])


# -- trusted proxies ------------------------------------------------------------------------


def test_client_address_believes_only_trusted_hops() -> None:
    proxies = parse_networks("10.0.0.0/8, 127.0.0.1")
    assert client_address("1.2.3.4", ["9.9.9.9"], proxies) == "1.2.3.4"  # not a proxy
    assert client_address("10.0.0.5", ["9.9.9.9"], proxies) == "9.9.9.9"
    # The client wrote 6.6.6.6; the proxy appended the address it saw, 9.9.9.9.
    assert client_address("10.0.0.5", ["6.6.6.6, 9.9.9.9"], proxies) == "9.9.9.9"
    assert client_address("10.0.0.5", ["6.6.6.6", "9.9.9.9, 10.1.1.1"], proxies) == "9.9.9.9"
    assert client_address("10.0.0.5", ["junk, 10.1.1.1"], proxies) == "10.1.1.1"
    assert client_address("10.0.0.5", [], proxies) == "10.0.0.5"
    assert client_address("127.0.0.1", ["9.9.9.9"], ()) == "127.0.0.1"  # nothing trusted
    with pytest.raises(ValueError, match="bogus"):
        parse_networks("10.0.0.0/8,bogus")


@pytest.mark.parametrize("trusted", [False, True])
async def test_forged_forwarded_for_does_not_reset_the_rate_limit(tmp_path, trusted) -> None:
    ctx = ApiContext(auth=auth(tmp_path), hub=hub_with("a.1"))
    options = {"rate": "3/minute", "trusted_proxies": LOCAL if trusted else ()}
    async with serving(ctx, options) as port, client_of(port) as client:

        async def get(forwarded: str | None) -> int:
            headers = {"X-Forwarded-For": forwarded} if forwarded else {}
            return (await client.get("/v1/sensors", headers=headers)).status_code

        first = [await get("7.7.7.7" if trusted else None) for _ in range(4)]
        forged = await get("5.5.5.5")
        forged_left = await get("5.5.5.6, 7.7.7.7")
    assert first == [401, 401, 401, 429]  # no credentials, but every attempt counts
    if trusted:  # 127.0.0.1 is a trusted proxy: its X-Forwarded-For names the client
        assert forged == 401  # a new client, a new bucket
        assert forged_left == 429  # the left entry was the client's own: ignored
    else:
        assert forged == 429 and forged_left == 429


@pytest.mark.parametrize("trusted", [False, True])
async def test_websocket_connect_rate_ignores_forged_forwarded_for(tmp_path, trusted) -> None:
    stream = StreamServer(
        Hub(),
        Authenticator(KeyStore(tmp_path / "keys.db"), enabled=False),
        "127.0.0.1",
        0,
        connect_rate="2/minute",
        trusted_proxies=LOCAL if trusted else (),
    )
    async with stream:
        url = f"ws://127.0.0.1:{stream.port}/v1/stream"

        async def opens(forwarded: str | None = None) -> int:
            headers = {"X-Forwarded-For": forwarded} if forwarded else None
            try:
                async with connect(url, additional_headers=headers):
                    return 101
            except InvalidStatus as exc:
                return exc.response.status_code

        first = [await opens("7.7.7.7" if trusted else None) for _ in range(3)]
        forged = await opens("5.5.5.5")
    assert first == [101, 101, 429]
    assert forged == (101 if trusted else 429)


# -- JWT ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "rules", "refused"),
    [
        ({}, {}, None),
        ({"exp": time.time() + 2 * 86_400}, {}, "longer than 86400"),
        ({"exp": time.time() + 7200}, {"max_ttl": 3600.0}, "longer than 3600"),
        ({"iat": None}, {}, "iat"),
        ({"iat": "0", "exp": str(int(time.time() + 86_400))}, {}, "longer than"),
        ({"iss": "other"}, {"issuer": "https://idp.example"}, "(?i)issuer"),
        ({}, {"issuer": "https://idp.example"}, "iss"),
        ({"iss": "https://idp.example"}, {"issuer": "https://idp.example"}, None),
        ({"aud": "someone-else"}, {"audience": "forecast"}, "(?i)audience"),
        ({}, {"audience": "forecast"}, "aud"),
        ({"aud": ["x", "forecast"]}, {"audience": "forecast"}, None),
    ],
)
def test_jwt_lifetime_issuer_and_audience(tmp_path, claims, rules, refused) -> None:
    made = token(**claims)
    if refused is None:
        assert auth(tmp_path, **rules).authenticate(made).role == "admin"
    else:
        with pytest.raises(AuthError, match=refused):
            auth(tmp_path, **rules).authenticate(made)


def test_short_or_weak_jwt_keys_are_refused_at_start(monkeypatch) -> None:
    short = "x" * 31
    with pytest.raises(AuthError, match="too short"):
        JwtVerifier("HS256", short)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = weak.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(AuthError, match="too short"):
        JwtVerifier("RS256", pem.decode())
    with pytest.raises(AuthError, match="not a valid key"):
        JwtVerifier("RS256", "-----BEGIN PUBLIC KEY-----")
    monkeypatch.setenv("FORECAST_JWT_SECRET", short)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "FORECAST_JWT_SECRET=***" in str(caught.value) and short not in str(caught.value)
    monkeypatch.setenv("FORECAST_JWT_SECRET", SECRET)
    assert load_settings().jwt_secret.get_secret_value() == SECRET


def test_a_short_secret_stops_the_cli_with_one_line(tmp_path) -> None:
    env = base_env(tmp_path, FORECAST_JWT_SECRET="short-secret")
    done = run_cli("keys", "list", env=env)
    assert done.returncode != 0
    assert "FORECAST_JWT_SECRET=***" in done.stderr and "short-secret" not in done.stderr


async def test_empty_scopes_see_no_sensor_over_http_and_websocket(tmp_path) -> None:
    authenticator = auth(tmp_path)
    hub = hub_with("a.1", "b.2")
    nothing, everything = token(scopes=[]), token()  # absent scopes: all sensors
    ctx = ApiContext(auth=authenticator, hub=hub)
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        empty = (await client.get("/v1/sensors", headers=bearer(nothing))).json()
        full = (await client.get("/v1/sensors", headers=bearer(everything))).json()
        latest = await client.get("/v1/sensors/a.1/forecast", headers=bearer(nothing))
    assert empty == {"sensors": []} and len(full["sensors"]) == 2
    assert latest.status_code == 404

    async with StreamServer(hub, authenticator, "127.0.0.1", 0) as stream:
        url = f"ws://127.0.0.1:{stream.port}/v1/stream?token="
        async with connect(url + nothing) as blind, connect(url + everything) as seeing:
            for ws in (blind, seeing):
                await ws.send(orjson.dumps({"op": "subscribe", "sensors": ["*"]}).decode())
                assert orjson.loads(await ws.recv())["type"] == "subscribed"
            message = {"type": "prediction", "sensor_id": "a.1", "seq": 9, "ts": "t", "model": "m"}
            hub.publish_prediction(message, orjson.dumps(message))
            assert orjson.loads(await seeing.recv())["sensor_id"] == "a.1"
            await blind.send('{"op": "ping", "id": 1}')
            assert orjson.loads(await blind.recv()) == {"type": "pong", "id": 1}


# -- websocket frames -----------------------------------------------------------------------


async def test_websocket_messages_that_cannot_be_echoed_get_error_frames(tmp_path) -> None:
    hub = Hub()
    authenticator = Authenticator(KeyStore(tmp_path / "keys.db"), enabled=False)
    deep = "[" * 1000 + "]" * 1000
    stream = StreamServer(hub, authenticator, "127.0.0.1", 0)
    async with stream, connect(f"ws://127.0.0.1:{stream.port}/v1/stream") as ws:

        async def ask(text: str) -> dict:
            await ws.send(text)
            async with asyncio.timeout(5):
                return orjson.loads(await ws.recv())

        replies = [
            await ask('{"op": "ping", "id": ' + deep + "}"),
            await ask('{"op": ' + deep + "}"),
            await ask('{"op": "ping", "id": ' + "[" * 2000 + "]" * 2000 + "}"),
            await ask('{"op": "ping", "id": 100000000000000000000000}'),
            await ask('{"op": "ping", "id": "' + "x" * 10_000 + '"}'),
        ]
        # A fault inside handling: an error frame, not a 1011 close.
        hub.gaps = _broken  # type: ignore[method-assign]
        replies.append(await ask('{"op": "subscribe", "sensors": ["a.*"]}'))
        alive = await ask('{"op": "ping", "id": "still-here"}')
    codes = [r.get("code") for r in replies]
    assert all(r["type"] == "error" for r in replies), replies
    assert codes == [
        "bad_request",
        "unknown_op",
        "bad_json",
        "bad_request",
        "bad_request",
        "bad_message",
    ]
    assert alive == {"type": "pong", "id": "still-here"}


def _broken(*args: object) -> None:
    raise RuntimeError("a bug")


# -- key files and scopes -------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_files_are_private_even_under_a_loose_umask(tmp_path) -> None:
    import sqlite3

    old = os.umask(0o022)
    try:
        keys = KeyStore(tmp_path / "keys.db")
        keys.create("viewer", "a")
        assert mode(tmp_path / "keys.db") == 0o600
        with sqlite3.connect(tmp_path / "keys.db") as db:  # SQLite's side files follow
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("UPDATE api_keys SET name = 'b'")
            assert mode(tmp_path / "keys.db-wal") == 0o600
        loose = tmp_path / "old.db"
        loose.touch(mode=0o644)
        loose.chmod(0o644)
        KeyStore(loose)
        assert mode(loose) == 0o600  # an existing file is set back
        run = tmp_path / "run"
        run.mkdir()
        (run / "owner.json").write_text("{}")
        (run / "owner.json").chmod(0o644)
        owner.claim(run, "http://x", "secret-token")
        assert mode(run / "owner.json") == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("scopes", [["ETTh1.OT,ETTh2.*"], [], ["a\nb"], ["x" * 201]])
async def test_bad_scopes_are_refused_by_the_store_and_the_api(tmp_path, scopes) -> None:
    with pytest.raises(AuthError) as caught:
        KeyStore(tmp_path / "keys.db").create("viewer", "x", scopes)
    assert caught.value.code == "bad_scope"
    ctx = ApiContext(auth=auth(tmp_path))
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        made = await client.post(
            "/v1/keys", json={"role": "viewer", "scopes": scopes}, headers=bearer(token())
        )
    assert made.status_code == 400 and made.json()["error"]["code"] == "bad_scope", made.text
    assert KeyStore(tmp_path / "keys.db").list() == []


def test_cli_refuses_a_scope_with_a_comma(tmp_path) -> None:
    env = base_env(tmp_path)
    refused = run_cli("keys", "create", "--scope", "ETTh1.OT,ETTh2.*", env=env)
    assert refused.returncode == 1
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors == refused.stderr.splitlines()[-1:]  # one line, the last (after the store's log)
    assert errors[0].startswith("error: scope 'ETTh1.OT,ETTh2.*' contains a comma")
    assert KeyStore(tmp_path / "keys.db").list() == []
    made = run_cli("keys", "create", "--scope", "ETTh1.OT", "--scope", "ETTh2.*", env=env)
    assert made.returncode == 0, made.stderr
    assert [k.scopes for k in KeyStore(tmp_path / "keys.db").list()] == [("ETTh1.OT", "ETTh2.*")]
    assert mode(tmp_path / "keys.db") == 0o600

"""The HTTP API in-process (an ASGI client, the real chDB store, a real registry): keys
and scopes, models by role, history, validation errors, blocking work off the event loop,
the generated OpenAPI document, and schemathesis against it (no 5xx, answers conform)."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from websockets.asyncio.client import connect

from forecast.schemas import Prediction
from gateway.auth import Authenticator, KeyStore
from gateway.history import missed
from gateway.http import ApiContext, create_app
from gateway.hub import Hub
from gateway.ws import StreamServer
from models.data import load_wide_csv
from models.fit import configure, fit
from models.registry import Registry
from sinks.clickhouse import Store
from sinks.webhooks import WebhookStore

pytestmark = pytest.mark.integration

SENSORS = [f"apitest.{c}" for c in ("OT", "HUFL", "LULL")]  # own rows (test ids stay stable)
OT, HUFL, _ = SENSORS
SEQS = 60  # per sensor, seq 1..60 (as a worker numbers them)


@dataclass
class Api:
    app: FastAPI
    ctx: ApiContext
    admin: str
    viewer: str
    registry: Registry


def prediction(sensor: str, seq: int, start: float) -> Prediction:
    ts = start + 3600 * seq
    return Prediction(
        sensor, ts, ts + 0.5, "lstm", 1, 3600.0, [seq] * 12, [0.0] * 12, [99.0] * 12, seq
    )


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, store: Store, short_csv: Path) -> Api:
    root = tmp_path_factory.mktemp("api")
    keys = KeyStore(root / "keys.db")
    admin, viewer = (keys.create(role, role)[1] for role in ("admin", "viewer"))
    registry = Registry(root / "models")
    tiny = configure("lstm", lookback=48, horizon=12, hidden=4, epochs=1)
    fitted = fit("lstm", load_wide_csv(short_csv), tiny)
    for _ in range(2):
        registry.register("lstm", fitted.artifact, fitted.meta)
    start = (time.time() // 3600 - 2 * SEQS) * 3600  # recent: the store's TTL keeps it
    published = [prediction(s, seq, start) for seq in range(1, SEQS + 1) for s in SENSORS]
    store.write_batch([], published, token=f"api-{SENSORS[0]}")
    hub = Hub()
    for p in published:
        hub.publish_prediction(p.to_message(), orjson.dumps(p.to_message()))
    ctx = ApiContext(auth=Authenticator(keys), hub=hub, store=store, registry=registry)
    # every target refused without a DNS lookup: the generated cases stay on this machine
    ctx.webhooks = WebhookStore(root / "webhooks.db", resolver=lambda host, port: ["127.0.0.1"])
    ctx.checks["store"] = lambda: asyncio.to_thread(store.ping)
    return Api(create_app(ctx, rate="100000/minute"), ctx, admin, viewer, registry)


@pytest.fixture
async def http(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def test_scoped_key_sees_only_its_sensors_over_http_and_websocket(api, http) -> None:
    pattern = OT.replace(".OT", ".O*")
    made = await http.post(
        "/v1/keys",
        headers=bearer(api.admin),
        json={"role": "viewer", "name": "ot-only", "scopes": [pattern]},
    )
    assert made.status_code == 200, made.text
    token, key_id = made.json()["token"], made.json()["key_id"]
    listed = (await http.get("/v1/keys", headers=bearer(api.admin))).json()["keys"]
    assert any(k["key_id"] == key_id and k["scopes"] == [pattern] for k in listed)
    assert all(token.split("_", 2)[2] not in orjson.dumps(k).decode() for k in listed)
    sensors = (await http.get("/v1/sensors", headers=bearer(token))).json()["sensors"]
    assert [s["sensor_id"] for s in sensors] == [OT]
    assert (await http.get(f"/v1/sensors?token={token}")).json()["sensors"] == sensors
    hidden = await http.get(f"/v1/sensors/{HUFL}/forecast", headers=bearer(token))
    assert hidden.status_code == 404
    assert (await http.get("/v1/keys", headers=bearer(token))).status_code == 403

    history = functools.partial(missed, api.ctx.store)
    stream = StreamServer(api.ctx.hub, api.ctx.auth, "127.0.0.1", 0, history=history)
    async with stream, connect(f"ws://127.0.0.1:{stream.port}/v1/stream?token={token}") as client:
        since = {OT: SEQS - 4, HUFL: SEQS - 4}
        await client.send(orjson.dumps({"op": "subscribe", "sensors": ["*"], "since_seq": since}))
        assert orjson.loads(await client.recv())["type"] == "subscribed"
        replayed = [orjson.loads(await client.recv()) for _ in range(4)]
    assert [(m["sensor_id"], m["seq"]) for m in replayed] == [
        (OT, seq) for seq in range(SEQS - 3, SEQS + 1)
    ]

    revoked = await http.delete(f"/v1/keys/{key_id}", headers=bearer(api.admin))
    assert revoked.json() == {"key_id": key_id, "revoked": True}
    assert (await http.get("/v1/sensors", headers=bearer(token))).status_code == 401
    again = await http.delete(f"/v1/keys/{key_id}", headers=bearer(api.admin))
    assert (again.status_code, again.json()["error"]["code"]) == (404, "not_found")


async def test_models_promote_and_rollback_need_the_operator_role(api, http) -> None:
    viewer, admin = bearer(api.viewer), bearer(api.admin)
    listed = (await http.get("/v1/models", headers=viewer)).json()["models"]
    assert [(m["name"], m["version"], m["stage"]) for m in listed] == [
        ("lstm", 1, "registered"),
        ("lstm", 2, "registered"),
    ]
    assert listed[0]["params"]["hidden"] == 4  # the whole metadata, not only the typed part
    assert (await http.post("/v1/models/lstm/1/promote", headers=viewer)).status_code == 403
    promoted = await http.post("/v1/models/lstm/1/promote", headers=admin)
    assert promoted.json() == {"name": "lstm", "version": 1, "stage": "production"}
    await http.post("/v1/models/lstm/2/promote", headers=admin)
    back = await http.post("/v1/models/rollback", headers=admin)
    assert back.json() == {"name": "lstm", "version": 1, "stage": "production"}
    nothing = await http.post("/v1/models/rollback", params={"stage": "shadow"}, headers=admin)
    assert (nothing.status_code, nothing.json()["error"]["code"]) == (409, "model_error")
    missing = await http.post("/v1/models/lstm/9/promote", headers=admin)
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "model_error")


async def test_forecast_history_newest_first(api, http) -> None:
    viewer = bearer(api.viewer)
    got = await http.get(f"/v1/sensors/{OT}/forecasts", params={"limit": 3}, headers=viewer)
    assert [f["seq"] for f in got.json()["forecasts"]] == [SEQS, SEQS - 1, SEQS - 2]
    latest = await http.get(f"/v1/sensors/{OT}/forecast", headers=viewer)
    assert got.json()["forecasts"][0] == latest.json()
    big = await http.get(
        f"/v1/sensors/{OT}/forecasts",
        params={"limit": 1000},
        headers={**viewer, "Accept-Encoding": "gzip"},
    )
    assert big.headers.get("content-encoding") == "gzip", big.text
    assert len(big.json()["forecasts"]) == SEQS


async def test_analyst_sql_and_export_are_scoped(api, http) -> None:
    made = await http.post(
        "/v1/keys", headers=bearer(api.admin), json={"role": "analyst", "scopes": [OT]}
    )
    analyst = bearer(made.json()["token"])
    sql = "SELECT DISTINCT sensor_id FROM forecast.predictions WHERE sensor_id LIKE 'api%'"
    seen = await http.post("/v1/query", json={"sql": sql, "max_rows": 10}, headers=analyst)
    assert seen.status_code == 200, seen.text
    assert seen.json() == {"columns": ["sensor_id"], "rows": [[OT]], "truncated": False}
    exported = await http.get("/v1/export", params={"format": "json"}, headers=analyst)
    assert exported.headers["content-type"] == "application/x-ndjson"
    assert {orjson.loads(line)["sensor_id"] for line in exported.text.splitlines()} == {OT}
    viewer = await http.post("/v1/query", json={"sql": "SELECT 1"}, headers=bearer(api.viewer))
    assert viewer.status_code == 403


@pytest.mark.parametrize(
    ("method", "path", "options", "field"),
    [
        ("GET", f"/v1/sensors/{OT}/forecasts", {"params": {"limit": 0}}, "limit"),
        ("GET", f"/v1/sensors/{OT}/forecasts", {"params": {"limit": "x"}}, "limit"),
        ("GET", f"/v1/sensors/{OT}/forecasts", {"params": {"from": "yesterday"}}, "from"),
        ("GET", "/v1/decisions", {"params": {"limit": 10_001}}, "limit"),
        ("GET", "/v1/export", {"params": {"format": "xlsx"}}, "format"),
        ("POST", "/v1/query", {"json": {"sql": "SELECT 1", "max_rows": True}}, "max_rows"),
        ("POST", "/v1/query", {"json": {"sql": "SELECT 1", "max_rows": 10**9}}, "max_rows"),
        ("POST", "/v1/query", {"json": {"max_rows": 5}}, "sql"),
        ("POST", "/v1/query", {"content": b"{not json"}, "body"),
        ("POST", "/v1/keys", {"json": {"scopes": ["a.*"]}}, "role"),
        ("POST", "/v1/keys", {"json": {"role": "viewer", "scopes": [""]}}, "scopes"),
        ("POST", "/v1/keys", {"json": ["viewer"]}, "body"),
        ("POST", "/v1/models/lstm/one/promote", {}, "version"),
        ("POST", "/v1/models/rollback", {"params": {"stage": "canary"}}, "stage"),
    ],
)
async def test_invalid_input_is_400_naming_the_field(api, http, method, path, options, field):
    got = await http.request(method, path, headers=bearer(api.admin), **options)
    assert got.status_code == 400, got.text
    assert got.json()["error"]["code"] == "bad_request"
    assert got.json()["error"]["message"].startswith(field), got.text


async def test_json_bodies_need_no_content_type_and_credentials_come_first(api, http) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}  # what `curl -d` sends
    body = b'{"sql": "SELECT 1 AS one"}'
    ok = await http.post("/v1/query", content=body, headers={**bearer(api.admin), **form})
    assert ok.json()["rows"] == [[1]], ok.text
    anonymous = await http.post("/v1/query", content=b"{not json", headers=form)
    assert anonymous.status_code == 401


async def test_blocking_work_runs_off_the_event_loop(api, http, monkeypatch) -> None:
    threads: dict[str, bool] = {}

    def watched(name: str, method: Callable) -> Callable:
        def call(*args, **kwargs):
            threads[name] = threading.current_thread() is threading.main_thread()
            return method(*args, **kwargs)

        return call

    monkeypatch.setattr(api.ctx.auth, "authenticate", watched("auth", api.ctx.auth.authenticate))
    keys = api.ctx.auth.keys
    monkeypatch.setattr(keys, "list", watched("keys", keys.list))
    monkeypatch.setattr(api.registry, "versions", watched("registry", api.registry.versions))
    store = api.ctx.store
    monkeypatch.setattr(store, "query", watched("store", store.query))
    for path in ("/v1/keys", "/v1/models", "/v1/decisions", f"/v1/sensors/{OT}/forecasts"):
        assert (await http.get(path, headers=bearer(api.admin))).status_code == 200
    assert threads == {"auth": False, "keys": False, "registry": False, "store": False}


async def test_tft_importances_and_loop_decisions(api, http, tiny_tft) -> None:
    api.registry.register("tft", tiny_tft.artifact, tiny_tft.meta)
    viewer = bearer(api.viewer)
    got = (await http.get("/v1/models/tft/1/importances", headers=viewer)).json()
    assert got["encoder"] == tiny_tft.meta["importances"]["encoder"]
    assert set(got["decoder"]) == {"hour_sin", "hour_cos", "dow_sin", "dow_cos"}
    lstm = await http.get("/v1/models/lstm/1/importances", headers=viewer)
    assert (lstm.status_code, lstm.json()["error"]["code"]) == (404, "no_importances")
    assert (await http.get("/v1/models/tft/1/importances")).status_code == 401
    action = f"test-{SENSORS[0]}"
    await asyncio.to_thread(api.ctx.store.write_decision, action, "lstm", 2, {"why": "test"})
    decisions = (await http.get("/v1/decisions", headers=viewer)).json()["decisions"]
    mine = [d for d in decisions if d["action"] == action]
    assert [(d["model"], d["model_version"], d["detail"]) for d in mine] == [
        ("lstm", 2, {"why": "test"})
    ]


async def test_health_readiness_and_parts_this_process_does_not_serve(api, http) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    assert (await http.head("/healthz")).status_code == 200
    assert (await http.get("/readyz")).json() == {"ready": True, "checks": {"store": True}}
    ctx = ApiContext(auth=api.ctx.auth)
    ctx.checks["broker"] = _false
    bare = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=bare, base_url="http://bare") as client:
        ready = await client.get("/readyz")
        missing = await client.get("/v1/sensors", headers=bearer(api.viewer))
    assert (ready.status_code, ready.json()) == (503, {"ready": False, "checks": {"broker": False}})
    assert (missing.status_code, missing.json()["error"]["code"]) == (503, "store_unavailable")
    assert missing.headers["retry-after"] == "5"


async def _false() -> bool:
    return False


# -- the generated document ----------------------------------------------------------------

GUARDED = {"401", "403", "408", "413", "429"}
ERRORS = {  # at least these, as the hand-written document had them
    ("/v1/sensors", "get"): {"503"},
    ("/v1/sensors/{sensor_id}/forecast", "get"): {"404", "503"},
    ("/v1/sensors/{sensor_id}/forecasts", "get"): {"400", "503"},
    ("/v1/models", "get"): set(),
    ("/v1/models/{name}/{version}/promote", "post"): {"400", "404"},
    ("/v1/models/{name}/{version}/importances", "get"): {"400", "404"},
    ("/v1/decisions", "get"): {"400", "503"},
    ("/v1/models/rollback", "post"): {"400", "409"},
    ("/v1/keys", "get"): set(),
    ("/v1/keys", "post"): {"400"},
    ("/v1/keys/{key_id}", "delete"): {"404"},
    ("/v1/query", "post"): {"400", "503"},
    ("/v1/export", "get"): {"400", "503"},
}


async def test_the_document_is_generated_from_the_routes(http) -> None:
    doc = (await http.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key (`fk_...`) or a JWT",
    }
    operations = {
        (path, method): op for path, item in doc["paths"].items() for method, op in item.items()
    }
    assert set(ERRORS) <= set(operations)
    assert {"/healthz", "/readyz", "/metrics"} <= set(doc["paths"])
    for key, expected in ERRORS.items():
        statuses = set(operations[key]["responses"])
        assert GUARDED | expected <= statuses, key
        assert operations[key]["security"] == [{"bearer": []}, {"token": []}], key
    for key, op in operations.items():
        assert "422" not in op["responses"], key  # FastAPI's own: answered 400 here
        for status, answer in op["responses"].items():
            if status >= "400" and key[0].startswith("/v1/"):
                error = answer["content"]["application/json"]["schema"]
                assert error == {"$ref": "#/components/schemas/Error"}, (key, status)
    query = operations[("/v1/query", "post")]["requestBody"]["content"]["application/json"]
    assert query["schema"] == {"$ref": "#/components/schemas/QueryRequest"}
    assert doc["components"]["schemas"]["KeyRequest"]["required"] == ["role"]
    history = operations[("/v1/sensors/{sensor_id}/forecasts", "get")]["responses"]["200"]
    assert history["content"]["application/json"]["schema"]["$ref"].endswith("/History")


# The document does not depend on what an app serves: take it from one that serves nothing.
schema = schemathesis.openapi.from_dict(create_app(ApiContext(auth=None)).openapi())  # type: ignore[arg-type]


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_zz_schemathesis_finds_no_server_error(case, api: Api) -> None:
    """Runs last: it creates and revokes keys and changes the registry's stages."""
    case.call_and_validate(
        app=api.app,
        headers=bearer(api.admin),
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            response_headers_conformance,
        ],
    )

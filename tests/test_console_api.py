"""The console's routes in-process (an ASGI client, the real chDB store, a real registry):
who the caller is, pipeline health from the metrics, the leaderboard on paired residuals,
drift, sensors searched, sorted and paged, one sensor's detail, scopes, bounds, and the
console's files."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest

from forecast import metrics
from forecast.schemas import DriftEvent, Prediction, Reading
from gateway.auth import Authenticator, KeyStore
from gateway.http import ApiContext, create_app
from gateway.hub import Hub
from models.registry import Registry
from sinks.clickhouse import Store

pytestmark = pytest.mark.integration

PREFIX = "contest"  # own rows in the shared store; stable for the test ids
A, B, C = (f"{PREFIX}.{name}" for name in ("A", "B", "C"))
START = datetime(2003, 3, 1, tzinfo=UTC).timestamp()  # far from every other test's rows
ISSUED = time.time()  # retention counts from the issue: a 2003 issue would expire at once
HOURS = 10
APP_JS = (Path(__file__).resolve().parents[1] / "gateway" / "static" / "app.js").read_bytes()


@dataclass
class Console:
    app: object
    ctx: ApiContext
    viewer: str
    operator: str
    scoped: str


def readings() -> list[Reading]:
    return [Reading(s, START + 3600 * i, float(i)) for s in (A, B, C) for i in range(HOURS)]


def predictions() -> list[Prediction]:
    """Production (lstm v1) one hour off at every hour; shadow (lstm v2) half an hour off
    for the first five hours only; B is served by the baseline from hour 6 on."""
    out = []
    for s in (A, B, C):
        for i in range(HOURS - 1):
            ts = START + 3600 * i
            model = "baseline" if s == B and i >= 6 else "lstm"
            out.append(
                Prediction(s, ts, ISSUED, model, 1, 3600.0, [i + 2.0], [i], [i + 3.0], i + 1)
            )
            if i < 5:
                shadow = Prediction(
                    s, ts, ISSUED, "lstm", 2, 3600.0, [i + 1.5], [i], [i + 1.0], i + 1, "shadow"
                )
                out.append(shadow)
    return out


def drift() -> list[DriftEvent]:
    return [
        DriftEvent(A, START + 3600 * 3, "adwin", "residual", "lstm", 1, {"error": 1.0}),
        DriftEvent(C, START + 3600 * 7, "page_hinkley", "level", "lstm", 1, {"value": 7.0}),
    ]


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, store: Store) -> Console:
    root = tmp_path_factory.mktemp("console")
    keys = KeyStore(root / "keys.db")
    viewer, operator = (keys.create(role, role)[1] for role in ("viewer", "operator"))
    scoped = keys.create("viewer", "a-only", [f"{PREFIX}.A"])[1]
    store.write_batch(readings(), predictions(), token=f"console-{PREFIX}", drift=drift())
    hub = Hub()
    for p in predictions():
        if p.stage == "production":
            hub.publish_prediction(p.to_message(), orjson.dumps(p.to_message()))
    metrics.ONLINE_MAE.labels(A, "lstm", "1").set(0.5)
    metrics.ONLINE_MAE.labels(A, "lstm", "6").set(9.0)  # not step 1: not what sorts
    metrics.ONLINE_COVERAGE.labels(A, "lstm", "1").set(0.75)
    metrics.ONLINE_MAE.labels(C, "lstm", "1").set(2.5)
    ctx = ApiContext(auth=Authenticator(keys), hub=hub, store=store, registry=Registry(root / "m"))
    return Console(create_app(ctx, rate="100000/minute"), ctx, viewer, operator, scoped)


@pytest.fixture
async def http(console: Console) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=console.app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def test_me_says_the_role_and_what_it_allows(console, http) -> None:
    viewer = (await http.get("/v1/me", headers=bearer(console.viewer))).json()
    assert viewer["role"] == "viewer" and viewer["scopes"] == ["*"]
    assert viewer["can"] == {"sql": False, "models": False, "keys": False}
    operator = (await http.get(f"/v1/me?token={console.operator}")).json()
    assert operator["can"] == {"sql": True, "models": True, "keys": False}
    refused = await http.get("/v1/me", headers=bearer("fk_nope_nope"))
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "unauthorized")


async def test_the_overview_reads_this_process_metrics(console, http) -> None:
    got = (await http.get("/v1/overview", headers=bearer(console.viewer))).json()
    accepted = sum(
        s.value
        for family in metrics.READINGS.collect()
        for s in family.samples
        if s.name.endswith("_total") and s.labels["result"] == "accepted"
    )
    assert got["pipeline"]["readings_total"] == int(accepted)
    assert got["pipeline"]["readings_per_second"] == 0.0  # the first sample has no rate
    assert got["sensors"] == 3
    scoped = (await http.get("/v1/overview", headers=bearer(console.scoped))).json()
    assert scoped["sensors"] == 1
    assert set(got["pipeline"]) >= {"dead_letters", "consumer_lag", "batch", "fallbacks"}


async def test_the_leaderboard_pairs_shadow_and_production_on_the_same_steps(console, http) -> None:
    window = {"from": "2003-03-01T00:00:00Z", "to": "2003-03-02T00:00:00Z"}
    got = await http.get("/v1/leaderboard", params=window, headers=bearer(console.scoped))
    assert got.status_code == 200, got.text
    board = got.json()
    assert board["paired"] is True
    rows = [(r["model"], r["model_version"], r["steps"], r["mae"]) for r in board["rows"]]
    # A only (the key's scope); the shadow's five steps, production on the same five
    assert rows == [("lstm", 2, 5, 0.5), ("lstm", 1, 5, 1.0)]
    everyone = await http.get("/v1/leaderboard", params=window, headers=bearer(console.viewer))
    steps = {(r["model"], r["model_version"]): r["steps"] for r in everyone.json()["rows"]}
    assert steps == {("lstm", 2): 15, ("lstm", 1): 15}  # baseline's steps have no shadow
    assert everyone.json()["rows"][0]["stage"] == "unknown"  # not in this registry


async def test_drift_newest_first_in_the_callers_scope(console, http) -> None:
    got = await http.get(
        "/v1/drift", params={"sensors": f"{PREFIX}.*"}, headers=bearer(console.viewer)
    )
    assert [(e["sensor_id"], e["signal"]) for e in got.json()["events"]] == [
        (C, "level"),
        (A, "residual"),
    ]
    assert got.json()["events"][0]["detail"] == {"value": 7.0}
    scoped = await http.get(
        "/v1/drift", params={"sensors": f"{PREFIX}.*"}, headers=bearer(console.scoped)
    )
    assert [e["sensor_id"] for e in scoped.json()["events"]] == [A]


async def test_sensors_search_sort_and_page(console, http) -> None:
    viewer = bearer(console.viewer)

    async def page(**params) -> dict:
        got = await http.get("/v1/console/sensors", params=params, headers=viewer)
        assert got.status_code == 200, got.text
        return got.json()

    found = await page(match=f"{PREFIX}.*")
    assert (found["total"], [s["sensor_id"] for s in found["sensors"]]) == (3, [A, B, C])
    assert found["sensors"][1]["model"] == "baseline"  # B's latest forecast
    assert found["sensors"][0]["next"] == HOURS - 2 + 2.0
    worst = await page(match=f"{PREFIX}.*", sort="error")
    assert [(s["sensor_id"], s["online_mae"]) for s in worst["sensors"]] == [
        (C, 2.5),
        (A, 0.5),
        (B, None),
    ]
    assert worst["sensors"][1]["online_coverage"] == 0.75
    recent = await page(match=f"{PREFIX}.*", sort="drift")
    assert [(s["sensor_id"], s["drift_events"]) for s in recent["sensors"]] == [
        (C, 1),
        (A, 1),
        (B, 0),
    ]
    second = await page(match=f"{PREFIX}.?", offset=1, limit=1)
    assert (second["total"], second["offset"], [s["sensor_id"] for s in second["sensors"]]) == (
        3,
        1,
        [B],
    )
    scoped = (
        await http.get("/v1/console/sensors", params={"match": "*"}, headers=bearer(console.scoped))
    ).json()
    assert [s["sensor_id"] for s in scoped["sensors"]] == [A]


async def test_a_sensors_actuals_stretches_drift_and_errors(console, http) -> None:
    got = await http.get(f"/v1/console/sensors/{B}", headers=bearer(console.viewer))
    assert got.status_code == 200, got.text
    detail = got.json()
    assert detail["actuals"] == {
        "ts": [START + 3600 * i for i in range(HOURS)],
        "value": [float(i) for i in range(HOURS)],
    }
    assert detail["truncated"] is False
    assert [(s["model"], s["forecasts"], s["fallback"]) for s in detail["stretches"]] == [
        ("lstm", 6, False),
        ("baseline", 3, False),  # no production model in this registry: not a fallback
    ]
    assert detail["forecast"]["model"] == "baseline" and detail["forecast"]["seq"] == HOURS - 1
    assert detail["errors"] == {"steps": HOURS - 1, "mae": 1.0, "coverage": 1.0}
    latest = await http.get(
        f"/v1/console/sensors/{A}", params={"limit": 3}, headers=bearer(console.viewer)
    )
    a = latest.json()
    assert a["actuals"]["value"] == [7.0, 8.0, 9.0] and a["truncated"] is True
    assert a["drift"] == []  # A's drift (hour 3) is before the readings shown
    assert [(o["model"], o["horizon"], o["mae"]) for o in a["online"]] == [
        ("lstm", 1, 0.5),
        ("lstm", 6, 9.0),
    ]
    hours = {"from": "2003-03-01T02:00:00Z", "to": "2003-03-01T05:00:00Z"}
    ranged = await http.get(
        f"/v1/console/sensors/{A}", params=hours, headers=bearer(console.viewer)
    )
    assert ranged.json()["actuals"]["value"] == [2.0, 3.0, 4.0]
    assert [e["signal"] for e in ranged.json()["drift"]] == ["residual"]
    hidden = await http.get(f"/v1/console/sensors/{B}", headers=bearer(console.scoped))
    assert (hidden.status_code, hidden.json()["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/v1/console/sensors", {"limit": 501}, "limit"),
        ("/v1/console/sensors", {"offset": -1}, "offset"),
        ("/v1/console/sensors", {"match": "a b"}, "match"),
        ("/v1/console/sensors", {"match": "x" * 201}, "match"),
        ("/v1/console/sensors", {"sort": "random"}, "sort"),
        ("/v1/drift", {"limit": 10_001}, "limit"),
        ("/v1/drift", {"from": "2003-03-02T00:00:00Z", "to": "2003-03-01T00:00:00Z"}, "to"),
        ("/v1/leaderboard", {"from": "2000-01-01T00:00:00Z", "to": "2003-01-01T00:00:00Z"}, "to"),
        (f"/v1/console/sensors/{A}", {"limit": 0}, "limit"),
        (f"/v1/console/sensors/{A}", {"from": "soon"}, "from"),
        ("/v1/console/sensors/<img src=x>", {}, "sensor_id"),
    ],
)
async def test_bounds_are_400_naming_the_field(console, http, path, params, field) -> None:
    got = await http.get(path, params=params, headers=bearer(console.viewer))
    assert got.status_code == 400, got.text
    assert got.json()["error"]["code"] == "bad_request"
    assert got.json()["error"]["message"].startswith(field), got.text


async def test_every_console_route_needs_credentials_and_is_documented(console, http) -> None:
    doc = (await http.get("/openapi.json")).json()
    paths = [
        "/v1/me",
        "/v1/overview",
        "/v1/leaderboard",
        "/v1/drift",
        "/v1/console/sensors",
        "/v1/console/sensors/{sensor_id}",
    ]
    for path in paths:
        operation = doc["paths"][path]["get"]
        assert operation["security"] == [{"bearer": []}, {"token": []}], path
        assert {"401", "403", "429"} <= set(operation["responses"]), path
        concrete = path.replace("{sensor_id}", A)
        assert (await http.get(concrete)).status_code == 401, path
    assert "/static/{name}" not in doc["paths"]


async def test_the_console_files_are_served_from_the_package(http) -> None:
    page = await http.get("/")
    assert "/static/app.js" in page.text and "/static/vendor/uplot/uPlot.iife.min.js" in page.text
    for name, media in [
        ("app.js", "text/javascript"),
        ("style.css", "text/css"),
        ("vendor/uplot/uPlot.iife.min.js", "text/javascript"),
        ("vendor/uplot/uPlot.min.css", "text/css"),
        ("vendor/uplot/LICENSE.txt", "text/plain"),
    ]:
        got = await http.get(f"/static/{name}")
        assert got.status_code == 200, name
        assert got.headers["content-type"].startswith(media), name
        assert got.headers["x-content-type-options"] == "nosniff"
    assert "MIT License" in (await http.get("/static/vendor/uplot/LICENSE.txt")).text
    for name in ["nope.js", "%2e%2e/http.py", "..%2fhttp.py", "../http.py", "", "vendor/"]:
        refused = await http.get(f"/static/{name}")
        assert refused.status_code == 404, name
        assert refused.json()["error"]["code"] == "not_found", name
    assert (await http.get("/static/app.js")).content == APP_JS


async def test_blocking_console_work_runs_off_the_event_loop(console, http, monkeypatch) -> None:
    seen: list[bool] = []
    query = console.ctx.store.query

    def watched(*args, **kwargs):
        seen.append(threading.current_thread() is threading.main_thread())
        return query(*args, **kwargs)

    monkeypatch.setattr(console.ctx.store, "query", watched)
    for path in ("/v1/leaderboard", "/v1/drift", "/v1/console/sensors", f"/v1/console/sensors/{A}"):
        assert (await http.get(path, headers=bearer(console.viewer))).status_code == 200, path
    assert seen and not any(seen)


def test_gauge_values_read_what_collect_reads() -> None:
    gauge = metrics.ONLINE_MAE
    gauge.labels(f"{PREFIX}.gv", "lstm", "24").set(1.25)
    collected = {
        (s.labels["sensor_id"], s.labels["model"], s.labels["horizon"]): s.value
        for family in gauge.collect()
        for s in family.samples
    }
    assert metrics.gauge_values(gauge) == collected
    assert collected[(f"{PREFIX}.gv", "lstm", "24")] == 1.25

"""``POST /v1/forecast``: on-demand forecasts equal the offline model on a posted window
and the streaming engine's latest prediction on the same stored readings; what-if
overrides change exactly what they override; errors, scopes, one forward pass per batch,
the answer cache, and the ``forecast forecast`` command against a real server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import torch

from forecast.parsing import parse_time
from forecast.schemas import Reading, iso
from gateway.api.context import ApiContext
from gateway.auth import Authenticator, KeyStore
from gateway.forecasts import MAX_READINGS, MAX_SENSORS, OnDemand
from gateway.http import HttpServer, create_app
from models.base import ModelSet
from models.baseline import SeasonalNaive
from models.data import calendar, load_wide_csv
from models.fit import configure, fit
from models.registry import Registry
from models.tft import TFTConfig, build_network
from sinks.clickhouse import Store
from streams.engine import Engine
from streams.pipeline import RawRecord
from streams.validate import Limits
from tests.conftest import base_env, run_cli

LOOKBACK, HORIZON = 48, 12
LIVE = ("od.OT", "od.HUFL", "od.LULL")  # streamed through the engine
SHORT = "od.short"  # fewer readings than the lookback: the baseline serves it
BATCH = tuple(f"od.b{i:03d}" for i in range(100))


@dataclass
class Api:
    app: object
    ctx: ApiContext
    viewer: str
    scoped: str
    series: object  # models.data.Series of the short ETTh1 file
    streamed: dict  # sensor -> its latest streamed prediction (dict of arrays)


def _records(sensors: dict[str, tuple[np.ndarray, np.ndarray]], per_batch: int) -> list:
    """Readings of every sensor interleaved in time, in record batches."""
    rows = sorted(
        (float(t), name, float(v))
        for name, (ts, vs) in sensors.items()
        for t, v in zip(ts, vs, strict=True)
    )
    records = [
        RawRecord(
            "readings", 0, i, name.encode(), orjson.dumps({"sensor_id": name, "ts": t, "value": v})
        )
        for i, (t, name, v) in enumerate(rows)
    ]
    return [records[i : i + per_batch] for i in range(0, len(records), per_batch)]


def _tft_artifact() -> tuple[dict, dict]:
    """A TFT with its initial weights (training one takes a minute here): the on-demand
    path is checked against the model's own offline forward, not for accuracy."""
    config = TFTConfig(lookback=24, horizon=6, hidden=8, heads=1)
    torch.manual_seed(0)
    net = build_network(config)
    return {"kind": "tft", "config": asdict(config), "state_dict": net.state_dict()}, {
        "kind": "tft"
    }


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, store: Store, short_csv: Path) -> Api:
    root = tmp_path_factory.mktemp("ondemand")
    keys = KeyStore(root / "keys.db")
    viewer = keys.create("viewer", "viewer")[1]
    scoped = keys.create("viewer", "scoped", scopes=("od.O*",))[1]
    registry = Registry(root / "models")
    series = load_wide_csv(short_csv)
    config = configure("lstm", lookback=LOOKBACK, horizon=HORIZON, hidden=8, epochs=1)
    artifact = fit("lstm", series, config).artifact
    # A short fit keeps the ridge start (its head is zero): a head of its own makes the
    # recurrent state, which the stream carries from a sensor's first window, count.
    head = artifact["state_dict"]["head.weight"]
    head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    version = registry.register("lstm", artifact, {"kind": "linear-lstm"})
    registry.promote("lstm", version)
    registry.register("tft", *_tft_artifact())
    # The streaming path: the engine serving the same production model, on the readings.
    lstm = registry.load("lstm", version)
    models = ModelSet(SeasonalNaive(horizon=HORIZON, season=24), lstm)
    engine = Engine(lambda: models, Limits(), 7200.0, lambda sensor: None)
    columns = {name: i for i, name in enumerate(series.columns)}
    live = {s: (series.ts[:300], series.values[:300, columns[s[3:]]]) for s in LIVE}
    live[SHORT] = (series.ts[:20], series.values[:20, columns["OT"]])
    streamed: dict = {}
    for batch in _records(live, 97):
        block = engine.process(batch).predictions
        for i, sensor in enumerate([] if block is None else block.sensor_id):
            streamed[sensor] = {
                "ts": block.ts[i],
                "model": block.model[i],
                "model_version": int(block.model_version[i]),
                "step_seconds": block.step_seconds[i],
                "yhat": block.yhat[i],
                "lower": block.lower[i],
                "upper": block.upper[i],
            }
    readings = [
        Reading(s, float(t), float(v))
        for s, (ts, vs) in live.items()
        for t, v in zip(ts, vs, strict=True)
    ]
    for i, sensor in enumerate(BATCH):
        column = series.values[:, i % series.values.shape[1]]
        readings += [
            Reading(sensor, float(t), float(v))
            for t, v in zip(series.ts[:80], column[:80], strict=True)
        ]
    store.write_batch(readings, [], token="ondemand-readings")
    ctx = ApiContext(auth=Authenticator(keys), store=store, registry=registry)
    ctx.ondemand = OnDemand(registry, store, horizon=HORIZON, season=24)
    return Api(create_app(ctx, rate="100000/minute"), ctx, viewer, scoped, series, streamed)


@pytest.fixture
async def http(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=api.app)
    headers = {"Authorization": f"Bearer {api.viewer}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://api", headers=headers) as c:
        yield c


def _posted(sensor: str, ts: np.ndarray, values: np.ndarray) -> dict:
    readings = [{"ts": float(t), "value": float(v)} for t, v in zip(ts, values, strict=True)]
    return {"sensor_id": sensor, "readings": readings}


async def _ok(http: httpx.AsyncClient, body: dict, **headers: str) -> list[dict]:
    response = await http.post("/v1/forecast", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["forecasts"]


async def _refused(http: httpx.AsyncClient, body: object, status: int, code: str, **headers) -> str:
    response = await http.post("/v1/forecast", json=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text
    return response.json()["error"]["message"]


async def test_a_posted_series_equals_the_offline_model(api: Api, http) -> None:
    values, ts = api.series.values[100:400, 0], api.series.ts[100:400]
    (got,) = await _ok(http, {"series": [_posted("any.sensor", ts, values)]})
    model = api.ctx.ondemand.models.get("lstm", 1)
    with torch.inference_mode():
        window = torch.as_tensor(values, dtype=torch.float32)[None]
        yhat, std, _ = model.net.segment(window, ts)
    want = yhat[0, -1].numpy()
    half = (std[0, -1] * model.quantiles).numpy()
    assert (got["model"], got["model_version"], got["ts"]) == ("lstm", 1, iso(ts[-1]))
    assert got["step_seconds"] == 3600.0 and got["what_if"] is None
    np.testing.assert_allclose(got["yhat"], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["lower"], want - half, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["upper"], want + half, rtol=1e-4, atol=1e-4)


async def test_the_tft_on_a_posted_series_equals_its_offline_forward(api: Api, http) -> None:
    from models.tft import forward, offline_windows

    values, ts = api.series.values[:400, 0], api.series.ts[:400]
    body = {"series": [_posted("any.sensor", ts, values)], "model": "tft", "model_version": 1}
    (got,) = await _ok(http, body)
    tft = api.ctx.ondemand.models.get("tft", 1)
    # the last complete window ends at the reading before the final `horizon` targets:
    # posting the values up to that origin gives its forecast
    encoder, future, _ = offline_windows(values, ts, tft.lookback, tft.horizon, tft.season)
    want = forward(tft.net, encoder[-1:], future[-1:])[0]
    origin = len(values) - tft.horizon
    body["series"] = [_posted("any.sensor", ts[:origin], values[:origin])]
    (at_origin,) = await _ok(http, body)
    assert got["model"] == "tft" and len(got["yhat"]) == tft.horizon
    np.testing.assert_allclose(at_origin["yhat"], want[:, 1], rtol=1e-4, atol=1e-4)


async def test_live_state_equals_the_latest_streamed_prediction(api: Api, http) -> None:
    got = await _ok(http, {"sensors": [*LIVE, SHORT]})
    assert [g["sensor_id"] for g in got] == [*LIVE, SHORT]
    for item in got:
        want = api.streamed[item["sensor_id"]]
        assert item["ts"] == iso(want["ts"]) and item["step_seconds"] == want["step_seconds"]
        assert (item["model"], item["model_version"]) == (want["model"], want["model_version"])
        for name in ("yhat", "lower", "upper"):
            np.testing.assert_allclose(item[name], want[name], rtol=1e-4, atol=1e-4)
    assert got[-1]["model"] == "baseline"  # warming up, as in the stream


async def test_what_if_differs_exactly_where_overrides_apply(api: Api, http) -> None:
    plain = await _ok(http, {"sensors": list(LIVE)})
    nxt = [30.0, 31.0, 29.5]
    body = {"sensors": list(LIVE), "what_if": {"next_values": {"od.OT": nxt}}}
    got = await _ok(http, body)
    for before, after in zip(plain, got, strict=True):  # equal up to float32 rounding
        assert before["ts"] == after["ts"] and before["model"] == after["model"]
        for name in ("yhat", "lower", "upper"):
            np.testing.assert_allclose(after[name], before[name], rtol=1e-6)
    assert got[1]["what_if"] is None and got[2]["what_if"] is None
    what_if = got[0]["what_if"]
    assert what_if["ts"] == iso(parse_time(got[0]["ts"]) + 3 * 3600)
    assert not np.allclose(what_if["yhat"], got[0]["yhat"])
    # the same as posting the stored readings with the assumed ones appended
    ts, values = api.series.ts[:300], api.series.values[:300, api.series.columns.index("OT")]
    extended = _posted("od.OT", np.r_[ts, ts[-1] + 3600 * np.arange(1, 4)], np.r_[values, nxt])
    (posted,) = await _ok(http, {"series": [extended]})
    np.testing.assert_allclose(what_if["yhat"], posted["yhat"], rtol=1e-5)


async def test_tft_covariates_that_change_nothing_give_the_plain_answer(api: Api, http) -> None:
    ts, values = api.series.ts[:300], api.series.values[:300, 0]
    future = calendar(ts[-1] + 3600 * np.arange(1, 7))
    same = {"hour_sin": future[:, 0].tolist(), "dow_cos": future[:, 3].tolist()}
    base = {"series": [_posted("x.a", ts, values)], "model": "tft", "model_version": 1}
    (got,) = await _ok(http, {**base, "what_if": {"covariates": {"x.a": same}}})
    assert got["what_if"]["yhat"] == got["yhat"] and got["what_if"]["ts"] == got["ts"]
    moved = {"hour_sin": [1.0] * 6}
    (changed,) = await _ok(http, {**base, "what_if": {"covariates": {"x.a": moved}}})
    assert changed["yhat"] == got["yhat"] and changed["what_if"]["yhat"] != got["yhat"]


async def test_horizon_cuts_the_answer(api: Api, http) -> None:
    (full,), (cut,) = [await _ok(http, {"sensors": ["od.OT"], "horizon": h}) for h in (12, 3)]
    assert cut["yhat"] == full["yhat"][:3] and len(cut["upper"]) == 3


async def test_errors_are_json_with_a_code(api: Api, http) -> None:
    ts, values = api.series.ts, api.series.values[:, 0]
    one = _posted("x.a", ts[:60], values[:60])
    await _refused(http, {"sensors": ["od.nobody"]}, 404, "unknown_sensor")
    long = {
        "series": [
            {"sensor_id": "x.a", "readings": [{"ts": 1e9, "value": 1.0}] * (MAX_READINGS + 1)}
        ]
    }
    await _refused(http, long, 413, "too_large")
    many = {"sensors": [f"s{i}" for i in range(MAX_SENSORS + 1)]}
    await _refused(http, many, 413, "too_large")
    covariates = {"covariates": {"x.a": {"hour_sin": [0.0]}}}
    message = await _refused(
        http, {"series": [one], "what_if": covariates}, 400, "unsupported_override"
    )
    assert "lstm" in message
    tft = {"series": [one], "model": "tft", "model_version": 1}
    await _refused(
        http,
        {**tft, "what_if": {"covariates": {"x.a": {"temp": [1.0]}}}},
        400,
        "unsupported_override",
    )
    await _refused(http, {"series": [one], "horizon": HORIZON + 1}, 400, "bad_horizon")
    await _refused(http, {"series": [one], "horizon": 0}, 400, "bad_request")
    await _refused(http, {"series": [one], "model_version": 9}, 404, "unknown_model")
    few = {"series": [_posted("x.a", ts[:30], values[:30])], "model": "lstm", "model_version": 1}
    await _refused(http, few, 400, "not_enough_readings")
    await _refused(http, {"sensors": ["od.OT"], "series": [one]}, 400, "bad_request")
    backwards = _posted("x.a", ts[:60][::-1], values[:60])
    await _refused(http, {"series": [backwards]}, 400, "bad_request")
    bad_value = {"sensor_id": "x.a", "readings": [{"ts": 1e9, "value": "1"}]}
    await _refused(http, {"series": [bad_value]}, 400, "bad_request")
    bad_ts = {"sensor_id": "x.a", "readings": [{"ts": "yesterday", "value": 1.0}]}
    await _refused(http, {"series": [bad_ts]}, 400, "bad_request")
    stranger = {"series": [one], "what_if": {"next_values": {"x.b": [1.0]}}}
    await _refused(http, stranger, 400, "bad_request")
    await _refused(
        http, {"series": [one], "what_if": {"next_values": {"x.a": []}}}, 400, "bad_request"
    )
    await _refused(http, {"sensors": ["bad id!"]}, 400, "bad_request")
    assert (
        await http.post("/v1/forecast", json={"sensors": ["od.OT"]}, headers={"Authorization": ""})
    ).status_code == 401


async def test_a_scoped_key_forecasts_only_its_sensors(api: Api, http) -> None:
    scoped = {"Authorization": f"Bearer {api.scoped}"}
    (mine,) = await _ok(http, {"sensors": ["od.OT"]}, **scoped)
    assert mine["sensor_id"] == "od.OT"
    await _refused(http, {"sensors": ["od.OT", "od.HUFL"]}, 404, "unknown_sensor", **scoped)
    posted = _posted("od.HUFL", api.series.ts[:60], api.series.values[:60, 0])
    await _refused(http, {"series": [posted]}, 403, "out_of_scope", **scoped)


async def test_a_batch_of_100_sensors_is_one_forward_pass_and_is_cached(
    api: Api, http, store: Store
) -> None:
    model = api.ctx.ondemand.models.get("lstm", 1)
    calls = []
    hook = model.net.lstm.register_forward_hook(lambda *args: calls.append(1))
    try:
        started = time.perf_counter()
        body = {"sensors": list(BATCH), "what_if": {"next_values": {BATCH[0]: [1.0]}}}
        got = await _ok(http, body)
        took = time.perf_counter() - started
        assert len(got) == 100 and len(calls) == 1 and took < 5.0
        assert {g["model"] for g in got} == {"lstm"} and got[0]["what_if"] is not None
        cache = api.ctx.ondemand.answers
        hits = cache.hits
        assert await _ok(http, body) == got and cache.hits == hits + 1 and len(calls) == 1
        # a new reading moves that sensor's state: answered afresh
        last = max(parse_time(g["ts"]) for g in got)
        store.write_batch([Reading(BATCH[5], last + 3600, 1.0)], [], token="ondemand-next")
        again = await _ok(http, body)
        assert len(calls) == 2 and again[5]["ts"] == iso(last + 3600) and again[6] == got[6]
    finally:
        hook.remove()


async def test_a_promotion_is_served_without_a_restart(api: Api, http) -> None:
    registry = api.ctx.registry
    (before,) = await _ok(http, {"sensors": ["od.OT"]})
    registry.promote("tft", 1)
    try:
        (after,) = await _ok(http, {"sensors": ["od.OT"]})
        assert after["model"] == "tft" and before["model"] == "lstm"
    finally:
        registry.rollback()


async def test_the_command_asks_a_running_gateway(api: Api, tmp_path: Path) -> None:
    csv = tmp_path / "posted.csv"
    rows = zip(api.series.ts[:60], api.series.values[:60, 0], strict=True)
    csv.write_text("ts,value\n" + "".join(f"{t},{v}\n" for t, v in rows))
    server = HttpServer(api.app, "127.0.0.1", 0)
    await server.start()
    env = base_env(tmp_path, FORECAST_API_KEY=api.viewer)
    url = f"http://127.0.0.1:{server.port}"
    table = ("od.OT", "--horizon", "2", "--what-if-next", "30,31")
    posted = ("x.posted", "--series", str(csv), "--format", "json")
    try:
        done = await asyncio.gather(
            *(
                asyncio.to_thread(run_cli, "forecast", *args, "--url", url, env=env)
                for args in (table, posted, ("od.nobody",))
            )
        )
    finally:
        await server.stop()
    table, posted, unknown = done
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "what-if" in lines[0] and len(lines) == 3 and lines[1].startswith("od.OT")
    assert posted.returncode == 0, posted.stderr
    (item,) = orjson.loads(posted.stdout)["forecasts"]
    assert item["sensor_id"] == "x.posted" and len(item["yhat"]) == HORIZON
    assert item["ts"] == iso(api.series.ts[59])
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: unknown_sensor:")
    assert len(unknown.stderr.strip().splitlines()) == 1

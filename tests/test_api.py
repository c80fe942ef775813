"""The HTTP API: keys and scopes, models by role, history, and schemathesis (no 5xx)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from models.registry import Registry
from tests.conftest import ETTH1, System, base_env, run_cli, start_system

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[System, str]]:
    data_dir = tmp_path_factory.mktemp("api")
    env = base_env(data_dir)
    for seed in ("1", "2"):
        trained = run_cli(
            "train",
            "--data",
            str(ETTH1),
            "--lookback",
            "48",
            "--horizon",
            "12",
            "--hidden",
            "4",
            "--epochs",
            "1",
            "--seed",
            seed,
            env=env,
            timeout=120,
        )
        assert trained.returncode == 0, trained.stderr
    created = run_cli("keys", "create", "--role", "admin", env=env)
    admin = created.stdout.split("token:  ")[1].split()[0]
    running = start_system(data_dir, FORECAST_RATE_HTTP="100000/minute")
    replay = running.cli("replay", str(ETTH1), "--limit", "60")
    assert replay.returncode == 0, replay.stderr
    deadline = time.monotonic() + 60
    while (
        httpx.get(
            f"{running.http}/v1/sensors/ETTh1.LULL/forecast", headers=bearer(running.viewer_token)
        )
        .json()
        .get("seq")
        != 59
    ):
        assert time.monotonic() < deadline, "the replay was not processed"
        time.sleep(0.2)
    yield running, admin
    assert running.stop() == 0


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def test_scoped_key_sees_only_its_sensors_over_http_and_websocket(api) -> None:
    system, admin = api
    async with httpx.AsyncClient(base_url=system.http) as http:
        made = await http.post(
            "/v1/keys",
            headers=bearer(admin),
            json={"role": "viewer", "name": "ot-only", "scopes": ["ETTh1.O*"]},
        )
        assert made.status_code == 200, made.text
        token = made.json()["token"]
        listed = (await http.get("/v1/keys", headers=bearer(admin))).json()["keys"]
        assert any(
            k["key_id"] == made.json()["key_id"] and k["scopes"] == ["ETTh1.O*"] for k in listed
        )
        assert all(token.split("_", 2)[2] not in json.dumps(k) for k in listed)
        sensors = (await http.get("/v1/sensors", headers=bearer(token))).json()["sensors"]
        assert [s["sensor_id"] for s in sensors] == ["ETTh1.OT"]
        hidden = await http.get("/v1/sensors/ETTh1.HUFL/forecast", headers=bearer(token))
        assert hidden.status_code == 404
        assert (await http.get("/v1/keys", headers=bearer(token))).status_code == 403

        async with connect(f"{system.ws}?token={token}") as ws:
            await ws.send(
                json.dumps(
                    {
                        "op": "subscribe",
                        "sensors": ["*"],
                        "since_seq": {"ETTh1.OT": 55, "ETTh1.HUFL": 55},
                    }
                )
            )
            assert orjson.loads(await ws.recv())["type"] == "subscribed"
            replayed = [orjson.loads(await ws.recv()) for _ in range(4)]
        assert [(m["sensor_id"], m["seq"]) for m in replayed] == [
            ("ETTh1.OT", seq) for seq in (56, 57, 58, 59)
        ]

        revoked = await http.delete(f"/v1/keys/{made.json()['key_id']}", headers=bearer(admin))
        assert revoked.status_code == 200
        assert (await http.get("/v1/sensors", headers=bearer(token))).status_code == 401


async def test_models_promote_and_rollback_need_the_operator_role(api) -> None:
    system, admin = api
    async with httpx.AsyncClient(base_url=system.http) as http:
        viewer = bearer(system.viewer_token)
        assert [
            m["version"] for m in (await http.get("/v1/models", headers=viewer)).json()["models"]
        ] == [1, 2]
        assert (await http.post("/v1/models/lstm/1/promote", headers=viewer)).status_code == 403
        assert (await http.post("/v1/models/lstm/1/promote", headers=bearer(admin))).json() == {
            "name": "lstm",
            "version": 1,
            "stage": "production",
        }
        await http.post("/v1/models/lstm/2/promote", headers=bearer(admin))
        back = await http.post("/v1/models/rollback", headers=bearer(admin))
        assert back.json() == {"name": "lstm", "version": 1, "stage": "production"}
        missing = await http.post("/v1/models/lstm/9/promote", headers=bearer(admin))
        assert (missing.status_code, missing.json()["error"]["code"]) == (404, "model_error")


async def test_forecast_history_newest_first(api) -> None:
    system, _ = api
    async with httpx.AsyncClient(base_url=system.http) as http:
        got = await http.get(
            "/v1/sensors/ETTh1.OT/forecasts",
            params={"limit": 3},
            headers=bearer(system.viewer_token),
        )
        assert [f["seq"] for f in got.json()["forecasts"]] == [59, 58, 57]
        latest = await http.get(
            "/v1/sensors/ETTh1.OT/forecast", headers=bearer(system.viewer_token)
        )
        assert got.json()["forecasts"][0] == latest.json()
        big = await http.get(
            "/v1/sensors/ETTh1.OT/forecasts",
            params={"limit": 1000},
            headers={**bearer(system.viewer_token), "Accept-Encoding": "gzip"},
        )
        assert big.headers["content-encoding"] == "gzip"


def test_schemathesis_finds_no_server_error(api, tmp_path: Path) -> None:
    system, admin = api
    st = str(Path(sys.executable).parent / "st")  # installed beside this interpreter
    result = subprocess.run(
        [
            st,
            "run",
            f"{system.http}/openapi.json",
            "--checks",
            "not_a_server_error",
            "-H",
            f"Authorization: Bearer {admin}",
            "--max-examples",
            "15",
            "--no-color",
            "--phases",
            "examples,fuzzing",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "No issues found" in result.stdout or "passed" in result.stdout


async def test_openapi_describes_every_v1_route(api) -> None:
    system, _ = api
    async with httpx.AsyncClient(base_url=system.http) as http:
        paths = (await http.get("/openapi.json")).json()["paths"]
    assert {"/v1/sensors", "/v1/query", "/v1/export", "/v1/keys", "/v1/models"} <= set(paths)
    await asyncio.sleep(0)


async def test_tft_importances_and_loop_decisions_over_http(api, tiny_tft) -> None:
    system, _ = api
    Registry(system.data_dir / "models").register("tft", tiny_tft.artifact, tiny_tft.meta)
    async with httpx.AsyncClient(base_url=system.http) as http:
        viewer = bearer(system.viewer_token)
        got = (await http.get("/v1/models/tft/1/importances", headers=viewer)).json()
        assert got["encoder"] == tiny_tft.meta["importances"]["encoder"]
        assert set(got["decoder"]) == {"hour_sin", "hour_cos", "dow_sin", "dow_cos"}
        lstm = await http.get("/v1/models/lstm/1/importances", headers=viewer)
        assert (lstm.status_code, lstm.json()["error"]["code"]) == (404, "no_importances")
        assert (await http.get("/v1/models/tft/1/importances")).status_code == 401
        assert (await http.get("/v1/decisions", headers=viewer)).json() == {"decisions": []}

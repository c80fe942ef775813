"""The closed loop, end to end: a shift is injected into a replayed stream, drift is
detected (ClickHouse, websocket, metrics), a retrained version enters as shadow, is
compared with production on live residuals and promoted."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner
from websockets.asyncio.client import connect

from forecast.settings import ENV_PREFIX, Settings, load_settings
from models.registry import Registry
from tests.conftest import ETTH1, System, base_env, run_cli, start_system

pytestmark = pytest.mark.integration

SHIFT_AT, FIRST, SECOND = 700, 1000, 800


@pytest.fixture(scope="module")
def shifted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ETTh1 with every channel shifted up by 6 standard deviations from row 700 on."""
    frame = pd.read_csv(ETTH1, nrows=FIRST + SECOND)
    values = frame.columns[1:]
    frame.loc[SHIFT_AT:, values] += 6 * frame.loc[: SHIFT_AT - 1, values].std()
    path = tmp_path_factory.mktemp("data") / "shifted.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def noise(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """White noise: a production model trained on it knows nothing of the real data."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(600, 7)), columns=[f"c{i}" for i in range(7)])
    frame.insert(0, "date", pd.date_range("2016-01-01", periods=600, freq="h"))
    path = tmp_path_factory.mktemp("data") / "noise.csv"
    frame.to_csv(path, index=False)
    return path


def decisions(system: System) -> list[dict]:
    response = httpx.get(
        f"{system.http}/v1/decisions",
        headers={"Authorization": f"Bearer {system.viewer_token}"},
    )
    assert response.status_code == 200, response.text
    return response.json()["decisions"][::-1]  # oldest first


def wait_for_action(system: System, action: str, within: float) -> list[dict]:
    deadline = time.monotonic() + within
    while True:
        done = decisions(system)
        if any(d["action"] == action for d in done):
            return done
        assert time.monotonic() < deadline, f"no {action!r} decision; so far: {done}"
        failed = [d["detail"] for d in done if d["action"] == "failed"]
        assert not failed, failed  # the errors, whole
        time.sleep(1.0)


def worker_group(system: System) -> str:
    """The consumer group the system's workers join, from the settings it runs with."""
    env = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in system.env.items()}
    settings = load_settings(**{k: v for k, v in env.items() if k in Settings.model_fields})
    return settings.topic(settings.worker_app)


async def group_settled(system: System, members: int, within: float = 60.0) -> None:
    """Wait until the workers' group is stable with ``members`` members: a
    rebalance in the middle of the replay would restart the moved sensors' detectors."""
    group_id = worker_group(system)
    admin = AIOKafkaAdminClient(bootstrap_servers=system.kafka)
    await admin.start()
    try:
        deadline = time.monotonic() + within
        while True:
            (group,) = await admin.describe_consumer_groups([group_id])
            _, _, state, _, _, joined = group.groups[0][:6]  # DescribeGroups v0 fields
            if state == "Stable" and len(joined) == members:
                return
            assert time.monotonic() < deadline, f"the workers' group did not settle: {state}"
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


async def replay_listening(system: System, *args: str) -> list[dict]:
    """Replay while a websocket subscriber listens; the drift messages it got."""
    got = []
    async with connect(f"{system.ws}?token={system.viewer_token}") as ws:
        await ws.send(json.dumps({"op": "subscribe", "sensors": ["shifted.*"]}))
        replay = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "forecast",
            "replay",
            *args,
            env={**system.env, "FORECAST_KAFKA_BOOTSTRAP": system.kafka},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        quiet_after: float | None = None
        while time.monotonic() < deadline:
            if quiet_after is None and replay.returncode is not None:
                quiet_after = time.monotonic() + 5  # what is still on its way
            if quiet_after is not None and time.monotonic() > quiet_after:
                break
            try:
                message = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
            except TimeoutError:
                continue
            if quiet_after is not None:  # the workers are still at it
                quiet_after = time.monotonic() + 5
            if message["type"] == "drift":
                got.append(message)
        assert await replay.wait() == 0
    return got


def test_a_shift_is_detected_retrained_compared_and_promoted(
    shifted: Path, noise: Path, tmp_path: Path
) -> None:
    """With two worker processes: the drift each detects on its partitions reaches the
    one loop (beside the sink), which decides once."""
    data_dir = tmp_path / "loop"
    model = ["--lookback", "48", "--horizon", "12", "--hidden", "8", "--epochs", "0"]
    trained = run_cli(
        "train", "--data", str(noise), *model, "--promote", "production", env=base_env(data_dir)
    )
    assert trained.returncode == 0, trained.stderr
    system = start_system(
        data_dir,
        "--workers",
        "2",
        FORECAST_RETRAIN_SENSORS="5",
        FORECAST_RETRAIN_WINDOW="21600",
        FORECAST_RETRAIN_COOLDOWN="0",
        FORECAST_RETRAIN_EPOCHS="1",
        FORECAST_COMPARE_RESIDUALS="500",
        FORECAST_WS_QUEUE_SIZE="20000",  # the listener takes every prediction of the replay
    )
    try:
        asyncio.run(group_settled(system, members=2))
        drift = asyncio.run(replay_listening(system, str(shifted), "--limit", str(FIRST)))
        assert drift, "no drift message reached the subscriber during the replay"
        heard = sorted({(m["signal"], m["sensor_id"]) for m in drift})
        print("drift at the subscriber (signal, sensor):", heard)
        done = wait_for_action(system, "trained", within=120)
        triggered = next(d for d in done if d["action"] == "triggered")
        assert len(triggered["detail"]["sensors"]) >= 5
        # At most two sensors share a partition, so five lie on three or more of the four
        # partitions: both workers (two partitions each) detected some of the drift.
        partition = DefaultPartitioner()
        partitions = {
            partition(s.encode(), [0, 1, 2, 3], [0, 1, 2, 3])
            for s in triggered["detail"]["sensors"]
        }
        assert len(partitions) >= 3
        assert next(d for d in done if d["action"] == "trained")["model_version"] == 2
        assert Registry(data_dir / "models").stage("shadow").version == 2

        second = system.cli("replay", str(shifted), "--start", str(FIRST), "--limit", str(SECOND))
        assert second.returncode == 0, second.stderr
        done = wait_for_action(system, "promoted", within=120)
        actions = [d["action"] for d in done]
        assert actions == ["triggered", "trained", "compared", "promoted"], actions  # once
        compared = done[-2]["detail"]
        assert compared["pairs"] >= 500 and compared["shadow_mae"] < compared["production_mae"]
        assert Registry(data_dir / "models").stage("production").version == 2

        shift_ts = pd.read_csv(shifted, nrows=SHIFT_AT + 1).iloc[SHIFT_AT, 0]
        rows = system.cli(
            "query",
            "SELECT count(DISTINCT sensor_id) AS sensors FROM forecast.drift_events "
            f"WHERE ts >= toDateTime64('{shift_ts}', 3, 'UTC') "
            f"AND ts < toDateTime64('{shift_ts}', 3, 'UTC') + INTERVAL 1 DAY",
            "--format",
            "json",
        )
        assert json.loads(rows.stdout)[0]["sensors"] >= 5, rows.stdout
        assert drift and all(m["sensor_id"].startswith("shifted.") for m in drift)
        assert {"detector", "signal", "model", "detail"} <= drift[0].keys()
        metrics = httpx.get(f"{system.http}/metrics").text
        assert 'forecast_retrain_decisions_total{action="promoted"} 1.0' in metrics
        assert "forecast_drift_events_total" in metrics
    finally:
        assert system.stop() == 0

"""A worker killed with SIGKILL mid-stream and restarted yields the predictions of an
uninterrupted run: none lost, none different, none visible twice."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.conftest import ETTH1, System, base_env, run_cli, start_system

pytestmark = pytest.mark.integration

ROWS = 400
EXPECTED = (ROWS - 1) * 7  # one-step predictions: every reading but each sensor's first
ONE_STEP = "SELECT count() FROM forecast.prediction_steps WHERE horizon = 1"


def predictions(system: System) -> list[dict]:
    result = system.cli(
        "query",
        # Per sensor: rows, the seq range, and an order-independent hash of every row.
        "SELECT sensor_id, count() AS n, min(seq) AS first, max(seq) AS last, "
        "toString(sum(cityHash64(seq, ts, horizon, yhat, lower, upper))) AS digest "
        "FROM forecast.prediction_steps GROUP BY sensor_id ORDER BY sensor_id",
        "--format",
        "json",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for_count(system: System, sql: str, at_least: int, within: float = 120) -> int:
    deadline = time.monotonic() + within
    while True:
        out = system.cli("query", sql, "--format", "csv")
        count = int(out.stdout.splitlines()[-1]) if out.returncode == 0 else 0
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.3)


def run(data_dir: Path, broker: str, prefix: str, kill_after: int | None) -> list[dict]:
    """Replay ROWS rows of ETTh1; with ``kill_after``, SIGKILL the worker once that many
    one-step predictions are stored, restart it, and let it finish."""
    env = {
        "FORECAST_KAFKA_BOOTSTRAP": broker,
        "FORECAST_TOPIC_PREFIX": prefix,
        "FORECAST_BATCH_MAX": "50",
    }
    # 20 rows/s when a kill is planned: the stream is still flowing when the kill lands,
    # however slowly the stored count is polled.
    speed = "360000" if kill_after is None else "72000"
    system = start_system(data_dir, **env)
    replay = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forecast",
            "replay",
            str(ETTH1),
            f"--limit={ROWS}",
            f"--speed={speed}",
        ],
        env={**system.env, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if kill_after is not None:
            assert wait_for_count(system, ONE_STEP, kill_after) >= kill_after
            system.process.send_signal(signal.SIGKILL)  # no goodbye: mid-batch, mid-commit
            system.process.wait()
            system.stop()
            stored = count_offline(data_dir)
            assert stored < EXPECTED, f"killed too late to test anything ({stored} stored)"
            system = start_system(data_dir, **env)
        assert replay.wait(120) == 0
        count = wait_for_count(system, ONE_STEP, EXPECTED)
        log = (data_dir / "up.log").read_text()[-4000:]
        assert count == EXPECTED, f"{count} of {EXPECTED} one-step predictions; up.log:\n{log}"
        rows = predictions(system)
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait()
        code = system.stop()
    assert code == 0
    return rows


def count_offline(data_dir: Path) -> int:
    """Predictions stored when the worker died (the store is free again)."""
    out = run_cli("query", ONE_STEP, "--format", "csv", env=base_env(data_dir))
    assert out.returncode == 0, out.stderr
    return int(out.stdout.splitlines()[-1])


WITHOUT_FINAL = """
import sys
from forecast.settings import load_settings
from sinks.clickhouse import Store

store = Store.open(load_settings(data_dir=sys.argv[1]))
for sql in (
    "SELECT count() - uniqExact(sensor_id, ts) FROM forecast.readings",
    "SELECT count() - uniqExact(sensor_id, model, model_version, ts) FROM forecast.predictions",
):
    print(store.query(sql, settings={"final": 0})[0][0])
"""


def duplicates_without_final(data_dir: Path) -> list[int]:
    """Rows seen twice in readings and predictions by a direct ClickHouse user who sets
    ``final = 0`` (the store opened by a process of its own, once the engine stopped)."""
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_FINAL, str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [int(line) for line in out.stdout.split()]


def test_sigkill_mid_stream_then_restart_gives_the_uninterrupted_predictions(
    broker: str, tmp_path: Path, uninterrupted: list[dict]
) -> None:
    """The whole of `forecast up` (worker and sink, mid-batch) killed and started again."""
    reference = uninterrupted
    recovered = run(tmp_path / "killed", broker, "killed.", kill_after=600)
    assert [r["n"] for r in reference] == [(ROWS - 1) * 24] * 7
    assert {(r["first"], r["last"]) for r in reference} == {(1, ROWS - 1)}
    assert recovered == reference
    assert duplicates_without_final(tmp_path / "killed") == [0, 0]


@pytest.fixture(scope="module")
def uninterrupted(broker: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run(tmp_path_factory.mktemp("steady"), broker, "steady2.", kill_after=None)


def test_one_of_two_workers_killed_gives_the_uninterrupted_predictions(
    broker: str, tmp_path: Path, uninterrupted: list[dict]
) -> None:
    """`forecast up --workers 2`: one worker is SIGKILLed mid-stream; the other takes over
    its partitions while the supervisor starts it again. ClickHouse (with and without
    FINAL) and a websocket subscriber see exactly the uninterrupted run's predictions."""
    data_dir = tmp_path / "two"
    env = {
        "FORECAST_KAFKA_BOOTSTRAP": broker,
        "FORECAST_TOPIC_PREFIX": "two.",
        "FORECAST_BATCH_MAX": "50",
    }
    system = start_system(data_dir, "--workers", "2", **env)
    pids = [
        int(p)
        for p in re.findall(
            r"\d+", next(x for x in system.output if x.startswith("workers:")).split("pids")[1]
        )
    ]
    seen: list[dict] = []
    listening = threading.Event()
    listener = threading.Thread(target=subscribe, args=(system, seen, listening), daemon=True)
    listener.start()
    assert listening.wait(30)
    replay = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forecast",
            "replay",
            str(ETTH1),
            f"--limit={ROWS}",
            "--speed=72000",
        ],
        env={**system.env, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for_count(system, ONE_STEP, 600) >= 600
        os.kill(pids[0], signal.SIGKILL)  # mid-batch, mid-commit
        assert replay.wait(120) == 0
        count = wait_for_count(system, ONE_STEP, EXPECTED)
        assert count == EXPECTED, (data_dir / "up.log").read_text()[-4000:]
        rows = predictions(system)
        time.sleep(2)  # the last predictions on their way to the subscriber
        stored = system.cli(
            "query",
            "SELECT sensor_id, seq, yhat[1] AS first FROM forecast.predictions "
            "WHERE stage = 'production' ORDER BY sensor_id, seq",
            "--format",
            "json",
        )
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait()
        code = system.stop()
    assert code == 0
    assert "exited with signal SIGKILL" in (data_dir / "up.log").read_text()
    assert rows == uninterrupted
    assert duplicates_without_final(data_dir) == [0, 0]
    expected = [(r["sensor_id"], r["seq"], r["first"]) for r in json.loads(stored.stdout)]
    delivered = [(m["sensor_id"], m["seq"], m["yhat"][0]) for m in seen]
    assert sorted(delivered) == expected  # each prediction once, none missing


def subscribe(system: System, seen: list[dict], listening: threading.Event) -> None:
    """Collect every prediction a websocket subscriber gets, until the system stops."""
    with ws_connect(f"{system.ws}?token={system.viewer_token}") as ws:
        ws.send(json.dumps({"op": "subscribe", "sensors": ["ETTh1.*"]}))
        ws.recv()
        listening.set()
        with contextlib.suppress(ConnectionClosed):
            for frame in ws:
                message = json.loads(frame)
                if message["type"] == "prediction":
                    seen.append(message)

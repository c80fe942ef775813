"""A worker killed with SIGKILL mid-stream and restarted yields the predictions of an
uninterrupted run: none lost, none different, none visible twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ETTH1, System, base_env, run_cli, start_system

pytestmark = pytest.mark.integration

ROWS = 400
EXPECTED = (ROWS - 1) * 7  # one-step predictions: every reading but each sensor's first
ONE_STEP = "SELECT count() FROM forecast.predictions WHERE horizon = 1"


def predictions(system: System) -> list[dict]:
    result = system.cli(
        "query",
        # Per sensor: rows, the seq range, and an order-independent hash of every row.
        "SELECT sensor_id, count() AS n, min(seq) AS first, max(seq) AS last, "
        "toString(sum(cityHash64(seq, ts, horizon, yhat, lower, upper))) AS digest "
        "FROM forecast.predictions GROUP BY sensor_id ORDER BY sensor_id",
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
    "SELECT count() - uniqExact(sensor_id, model, model_version, ts, horizon) "
    "FROM forecast.predictions",
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
    broker: str, tmp_path: Path
) -> None:
    reference = run(tmp_path / "steady", broker, "steady.", kill_after=None)
    recovered = run(tmp_path / "killed", broker, "killed.", kill_after=600)
    assert [r["n"] for r in reference] == [(ROWS - 1) * 24] * 7
    assert {(r["first"], r["last"]) for r in reference} == {(1, ROWS - 1)}
    assert recovered == reference
    assert duplicates_without_final(tmp_path / "killed") == [0, 0]

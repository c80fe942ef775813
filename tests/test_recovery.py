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

from tests.conftest import ETTH1, System, base_env, start_system

pytestmark = pytest.mark.integration

ROWS = 400


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
    env = {
        "FORECAST_KAFKA_BOOTSTRAP": broker,
        "FORECAST_TOPIC_PREFIX": prefix,
        "FORECAST_BATCH_MAX": "50",
    }
    system = start_system(data_dir, **env)
    replay = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forecast",
            "replay",
            str(ETTH1),
            "--limit",
            str(ROWS),
            "--speed",
            "360000",
        ],
        env={**system.env, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    total = "SELECT count() FROM forecast.predictions WHERE horizon = 1"
    expected = (ROWS - 1) * 7
    if kill_after is not None:
        assert wait_for_count(system, total, kill_after) >= kill_after
        system.process.send_signal(signal.SIGKILL)  # no goodbye: mid-batch, mid-commit
        system.process.wait()
        system.stop()
        assert wait_for_count_offline(data_dir) < expected, "killed too late to test anything"
        system = start_system(data_dir, **env)
    replay.wait(120)
    assert wait_for_count(system, total, expected) == expected
    rows = predictions(system)
    assert system.stop() == 0
    return rows


def wait_for_count_offline(data_dir: Path) -> int:
    """Predictions stored when the worker died (the store is free again)."""
    from tests.conftest import run_cli

    out = run_cli(
        "query",
        "SELECT count() FROM forecast.predictions WHERE horizon = 1",
        "--format",
        "csv",
        env=base_env(data_dir),
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.splitlines()[-1])


def test_sigkill_mid_stream_then_restart_gives_the_uninterrupted_predictions(
    broker: str, tmp_path: Path
) -> None:
    reference = run(tmp_path / "steady", broker, "steady.", kill_after=None)
    recovered = run(tmp_path / "killed", broker, "killed.", kill_after=600)
    assert [r["n"] for r in reference] == [(ROWS - 1) * 24] * 7
    assert {(r["first"], r["last"]) for r in reference} == {(1, ROWS - 1)}
    assert recovered == reference

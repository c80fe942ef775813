"""The benchmarks run and report what they measured (no speed is asserted here: targets
live in `forecast bench`, not in timed tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ETTH1, base_env, run_cli

pytestmark = pytest.mark.integration


def bench(tmp_path: Path, *args: str) -> str:
    result = run_cli("bench", *args, env=base_env(tmp_path), timeout=240)
    assert result.returncode == 0, result.stderr
    assert "machine: " in result.stdout and "command: forecast bench" in result.stdout
    return result.stdout


@pytest.fixture(scope="module")
def lstm(tmp_path_factory: pytest.TempPathFactory, short_csv: Path) -> list[str]:
    """Options that serve an LSTM trained for seconds on a short file, cached for the
    module (the first bench trains it)."""
    cache = tmp_path_factory.mktemp("model-cache")
    return ["--train-data", str(short_csv), "--train-epochs", "1", "--model-cache", str(cache)]


def served(line: str) -> dict[str, int]:
    """``lstm 2000, baseline 3; fallbacks 3`` as counts by model, and ``fallbacks``."""
    models, fallbacks = line.split("; fallbacks ")
    counts = {m: int(n) for m, n in (part.rsplit(" ", 1) for part in models.split(", "))}
    return {**counts, "fallbacks": int(fallbacks.split()[0])}


def test_throughput_compares_the_engine_with_plain_faust_and_a_raw_consumer(tmp_path, lstm) -> None:
    args = ["--readings", "2000", "--per-record", "10", "--sensors", "5", "--workers", "1"]
    out = bench(tmp_path, "throughput", *args, *lstm)
    rates = re.findall(r"([\d,]+) readings/s", out)
    assert len(rates) == 4 and all(float(r.replace(",", "")) > 0 for r in rates), out
    assert "lstm (lookback 336, horizon 24" in out and "in production" in out, out
    assert re.search(r"warm-up \(not timed\): 1680 readings \(336 per sensor\)", out), out
    timed = served(re.search(r"engine worker .*\n  served in the timed part: (.*)", out).group(1))
    assert timed == {"lstm": 2000, "fallbacks": 0}, out
    assert "engine, 1 worker process" in out and "--model lstm" in out, out


def test_throughput_keeps_the_baseline_only_mode(tmp_path) -> None:
    args = ["--readings", "1000", "--per-record", "10", "--sensors", "5", "--model", "baseline"]
    out = bench(tmp_path, "throughput", *args)
    assert "baseline alone" in out and "served in the timed part: baseline 1000" in out, out


def test_latency_reports_percentiles_of_received_predictions(tmp_path, lstm) -> None:
    args = ["--rate", "200", "--sensors", "20", "--seconds", "3"]
    out = bench(tmp_path, "latency", *args, *lstm)
    received = int(re.search(r"(\d+) predictions received", out).group(1))
    assert received > 500, out  # 600 readings timed, every window full before
    assert re.search(r"subscriber: p50 [\d.]+ ms, p99 [\d.]+ ms", out), out
    assert re.search(r"raw aiokafka consumer.*one broker hop.*: p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    timed = served(re.search(r"served in the timed part: (.*)", out).group(1))
    assert timed["lstm"] == received and timed["fallbacks"] == 0, out


def test_broker_reports_one_hop_as_the_topic_grows(tmp_path) -> None:
    out = bench(tmp_path, "broker", "--rate", "200", "--seconds", "1", "--stored", "0,300")
    held = [int(n) for n in re.findall(r"topic holding +(\d+) records: .* p50 [\d.]+ ms", out)]
    assert held == [0, 300], out  # the first run's 200 readings stay, 100 more are stored


def test_restore_recovers_every_sensor_with_the_uninterrupted_forecast(tmp_path, lstm) -> None:
    out = bench(tmp_path, "restore", "--sensors", "30", "--sample", "10", *lstm)
    assert re.search(r"recovered the state of 30 of 30 sensors .* in [\d.]+s", out), out
    assert "served after the restart: lstm 30; fallbacks 0" in out, out
    assert "check: 10 of 10 sampled sensors" in out, out


def test_drift_reports_delays_and_false_alarms(tmp_path) -> None:
    out = bench(
        tmp_path,
        "drift",
        "--dataset",
        str(ETTH1),
        "--detectors",
        "adwin,page_hinkley",
        "--injections",
        "1",
    )
    rows = [line for line in out.splitlines() if line.startswith(("adwin", "page_hinkley"))]
    assert len(rows) == 2 and all(re.search(r"\d+/7", row) for row in rows), out


def test_memory_reports_resident_memory_over_time(tmp_path, lstm) -> None:
    args = ["--sensors", "30", "--minutes", "0.1", "--interval", "0.5"]
    out = bench(tmp_path, "memory", *args, *lstm)
    assert "tft (encoder 96, cadence 24) as shadow" in out, out
    assert re.search(r"windows filled with 10,080 readings in 30 records", out), out
    found = re.search(r"min (\d+) MiB, max (\d+) MiB, slope [-+][\d.]+ MiB/min", out)
    assert found and 0 < int(found.group(1)) <= int(found.group(2)), out
    assert "over time (min: MiB): 0.0: " in out, out

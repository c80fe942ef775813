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


def test_throughput_compares_the_engine_with_plain_faust_and_a_raw_consumer(tmp_path) -> None:
    out = bench(tmp_path, "throughput", "--readings", "3000", "--per-record", "10")
    rates = re.findall(r"([\d,]+) readings/s", out)
    assert len(rates) == 3 and all(float(r.replace(",", "")) > 0 for r in rates), out


def test_latency_reports_percentiles_of_received_predictions(tmp_path) -> None:
    out = bench(tmp_path, "latency", "--rate", "200", "--sensors", "20", "--seconds", "3")
    received = int(re.search(r"(\d+) predictions received", out).group(1))
    assert received > 300, out  # 600 readings timed, each sensor forecasting from its 2nd
    assert re.search(r"p50 [\d.]+ ms, p99 [\d.]+ ms", out), out


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


def test_memory_reports_resident_memory_and_state_size(tmp_path) -> None:
    out = bench(tmp_path, "memory", "--sensors", "50", "--minutes", "0")
    assert re.search(r"resident: \d+ MiB when every window was full", out), out
    assert float(re.search(r"state: ([\d.]+) KiB per sensor", out).group(1)) > 1, out

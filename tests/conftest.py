"""Shared fixtures: a running system (`forecast up` as a real subprocess) on free ports."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from sinks.clickhouse import Store

ROOT = Path(__file__).resolve().parents[1]
ETTH1 = ROOT.parent / "shared" / "data" / "ett" / "ETTh1.csv"


@dataclass
class System:
    """A `forecast up` process and what it printed about itself."""

    process: subprocess.Popen
    env: dict[str, str]
    kafka: str
    http: str
    ws: str
    viewer_token: str
    output: list[str]
    log: IO[str]
    data_dir: Path

    def cli(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        """Run the `forecast` CLI against this system."""
        return run_cli(
            *args, env={**self.env, "FORECAST_KAFKA_BOOTSTRAP": self.kafka, **env}, timeout=timeout
        )

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.log.close()
        return self.process.returncode


def base_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORECAST_")}
    env.update(
        FORECAST_DATA_DIR=str(data_dir),
        FORECAST_HTTP_PORT="0",
        FORECAST_WS_PORT="0",
        FORECAST_KAFKA_SESSION_TIMEOUT="2",
        FORECAST_LOG_LEVEL="INFO",
        FORECAST_INFERENCE_THREADS="1",  # the tests' systems share 2 CPUs with each other
    )
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "forecast", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_system(data_dir: Path, *args: str, **extra: str) -> System:
    data_dir.mkdir(parents=True, exist_ok=True)
    env = base_env(data_dir, **extra)
    log = (data_dir / "up.log").open("a")
    process = subprocess.Popen(
        [sys.executable, "-m", "forecast", "up", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"forecast up exited early: {(data_dir / 'up.log').read_text()[-3000:]}"
            )
        lines.append(line.rstrip())
        if line.startswith("ready"):
            break
    else:
        process.kill()
        raise RuntimeError("forecast up did not become ready")
    text = "\n".join(lines)
    return System(
        process=process,
        env=env,
        kafka=re.search(r"kafka:\s+(\S+)", text).group(1),
        http=re.search(r"http:\s+(\S+)", text).group(1),
        ws=re.search(r"websocket:\s+(\S+)", text).group(1),
        viewer_token=re.search(r"token=([^&\s]+)", text).group(1),
        output=lines,
        log=log,
        data_dir=data_dir,
    )


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    running = start_system(tmp_path_factory.mktemp("system"))
    yield running
    assert running.stop() == 0


TINY_TFT = {
    "lookback": 24,
    "horizon": 6,
    "hidden": 8,
    "heads": 1,
    "epochs": 2,
    "batches_per_epoch": 8,
    "batch_size": 64,
}


@pytest.fixture(scope="session")
def short_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 1200 hours of ETTh1 (split 60/20/20 by the protocol's rules)."""
    path = tmp_path_factory.mktemp("data") / "ETTh1-short.csv"
    lines = ETTH1.read_text().splitlines()[:1201]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_tft(short_csv: Path):
    """A TFT trained for seconds: enough to check its plumbing, not its accuracy."""
    from models.data import load_wide_csv
    from models.fit import configure, fit

    return fit("tft", load_wide_csv(short_csv), configure("tft", **TINY_TFT))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = base_env(tmp_path_factory.mktemp("broker"))
    process = subprocess.Popen(
        [sys.executable, "-m", "forecast", "broker"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    first = process.stdout.readline()
    address = re.search(r"kafka: (\S+)", first).group(1)
    yield address
    process.send_signal(signal.SIGINT)
    process.wait(20)
    process.stdout.close()


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """A real chDB store; chDB holds one data directory per process, so tests share it."""
    from forecast.settings import load_settings
    from sinks.clickhouse import Store

    opened = Store.open(load_settings(data_dir=tmp_path_factory.mktemp("store")))
    yield opened
    opened.close()


def wait_for_model(system: System, version: int, stage: str) -> None:
    """Until the worker serves lstm ``version`` as ``stage`` (its model metric says so)."""
    pattern = rf'forecast_model_info{{name="lstm",stage="{stage}",version="{version}"}} 1.0'
    deadline = time.monotonic() + 20
    while not re.search(pattern, httpx.get(f"{system.http}/metrics").text):
        assert time.monotonic() < deadline, f"lstm v{version} never became {stage}"
        time.sleep(0.2)

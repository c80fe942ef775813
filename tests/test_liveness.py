"""A worker that cannot make progress says so: ``/readyz`` turns 503 (check ``consuming``),
and it exits non-zero, for its supervisor to restart it, past FORECAST_STALL_EXIT or at
once when the broker lost its data. SIGTERM ends it within 10 s whatever the broker does.

The integration tests run ``forecast broker`` on a fixed port, kill it (tansu with memory
storage: it comes back empty), freeze it (SIGSTOP: requests hang) and start it again.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from streams.liveness import Liveness
from tests.conftest import ETTH1, base_env, run_cli

ONE_STEP = "SELECT count() FROM forecast.prediction_steps WHERE horizon = 1"


# -- the rules (pure) ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_idle_stream_is_not_a_stall() -> None:
    clock = Clock()
    live = Liveness(stall_after=30, exit_after=120, clock=clock)
    live.took_in({"p": 10})
    for _ in range(20):
        clock.now += 10
        assert live.observe({"p": 10}, {"p": 10}, fetched={"p": 10}) == []
    assert not live.stalled() and live.idle_for() == 0
    # Nothing ever read, nothing to read: idle as well.
    fresh = Liveness(stall_after=30, exit_after=120, clock=clock)
    clock.now += 100
    fresh.observe({"p": None}, {"p": 0})
    assert not fresh.stalled()


def test_records_waiting_and_none_taken_in_is_a_stall_then_a_fault() -> None:
    clock = Clock()
    live = Liveness(stall_after=30, exit_after=120, clock=clock)
    live.took_in({"p": 10})
    clock.now = 29
    live.observe({"p": 10, "q": 0}, {"p": 15, "q": 3})
    assert not live.stalled() and live.cause == "8 records behind on 2 partitions, none taken in"
    clock.now = 30
    assert live.stalled() and not live.expired()
    clock.now = 120
    assert live.expired()
    live.took_in({"p": 11})  # progress again
    assert not live.stalled() and live.idle_for() == 0


def test_a_broker_that_does_not_answer_or_a_recovery_is_no_progress() -> None:
    clock = Clock()
    live = Liveness(stall_after=30, exit_after=120, clock=clock)
    clock.now = 31
    live.observe({"p": 10}, None, fetched={"p": 10})  # the cached fetch end proves nothing
    assert live.stalled() and "did not answer" in live.cause
    live = Liveness(stall_after=30, exit_after=120, clock=clock)
    clock.now = 62
    live.observe({"p": 10}, {"p": 10}, recovering=True)
    assert live.stalled() and "recovering" in live.cause
    # No partition assigned (more workers than partitions), no rebalance: idle.
    live.observe({}, None)
    assert not live.stalled()


def test_an_end_below_what_was_read_is_data_lost_by_the_broker() -> None:
    clock = Clock()
    live = Liveness(stall_after=30, exit_after=120, clock=clock)
    live.took_in({"p": 175, "q": 40})
    # tansu answers offset requests below the end after big batches: not a loss.
    assert live.observe({"p": 175, "q": 40}, {"p": 120, "q": 40}, fetched={"p": 175}) == []
    # A fetch's end below what was read: the log went back (a broker restarted empty).
    lost = live.observe({"p": 175, "q": 40}, {"p": 0, "q": 0}, fetched={"p": 0, "q": None})
    assert [(x.partition, x.end, x.reached) for x in lost] == [("p", 0, 175)]
    # What was read after the ends were looked at does not count.
    assert live.observe({"q": 40}, {"q": 30}, fetched={"q": 30}, reached={"q": 30}) == []


async def test_faust_keeps_its_state_under_the_data_dir(tmp_path: Path) -> None:
    from forecast.settings import load_settings
    from models.baseline import SeasonalNaive
    from streams.pipeline import ModelSet
    from streams.worker import Worker

    models = ModelSet(SeasonalNaive(horizon=3, season=2))
    worker = Worker(load_settings(data_dir=tmp_path), "127.0.0.1:9", lambda: models)
    assert worker.app.conf.datadir == tmp_path / "faust" / "worker-0"  # one per process
    assert await worker.consuming()  # not stalled before it started


async def test_a_crashed_table_recovery_is_named(tmp_path: Path) -> None:
    from faust.exceptions import ConsistencyError

    from forecast.settings import load_settings
    from models.baseline import SeasonalNaive
    from streams.pipeline import ModelSet
    from streams.worker import Worker, crashed_service

    models = ModelSet(SeasonalNaive(horizon=3, season=2))
    worker = Worker(load_settings(data_dir=tmp_path), "127.0.0.1:9", lambda: models)
    assert crashed_service(worker.app) is None
    # What Faust's recovery raises after a broker restarted empty (issue 11).
    await worker.app.tables.recovery.crash(ConsistencyError("persisted offset 812 > -1"))
    reason = crashed_service(worker.app)
    assert reason.startswith("Faust's Recovery crashed: ConsistencyError(")
    assert "the broker lost the changelog's data" in reason


def test_the_watchdog_ends_a_process_that_does_not_stop() -> None:
    code = (
        "from forecast.runtime import Watchdog; import time; print('imported', flush=True); "
        "Watchdog(0.3).arm(); time.sleep(30)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as process:
        assert process.stdout is not None and process.stdout.readline() == "imported\n"
        armed = time.monotonic()  # the imports may take long on a loaded machine: not timed
        assert process.wait(timeout=20) == 1
        assert time.monotonic() - armed < 10


# -- against a real broker that is killed, frozen and restarted ---------------------------


class Broker:
    """``forecast broker`` on a fixed port, to kill, freeze and start again."""

    def __init__(self, data_dir: Path) -> None:
        from streams.broker import free_port

        self.env = base_env(data_dir, FORECAST_BROKER_PORT=str(free_port()))
        self.process: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "forecast", "broker"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        first = self.process.stdout.readline()
        self.address = re.search(r"kafka: (\S+)", first).group(1)

    def tansu(self) -> int:
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return int(children[0])

    def kill(self) -> None:
        """SIGKILL the broker itself (its memory goes with it), then its launcher."""
        os.kill(self.tansu(), signal.SIGKILL)
        self.stop()

    def freeze(self, frozen: bool = True) -> None:
        os.kill(self.tansu(), signal.SIGSTOP if frozen else signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()


class Part:
    """``forecast worker`` or ``forecast up`` as a subprocess, with its HTTP address."""

    def __init__(self, command: str, env: dict[str, str], log: Path, within: float = 90) -> None:
        self.log_path = log
        self.log: IO[str] = log.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "forecast", command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.http = ""
        self.lines: queue.Queue[str] = queue.Queue()  # stdout, read by a thread to the end
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self._until_ready(command, within)
        except BaseException:  # not left running after the test
            self.close()
            raise

    def _read(self) -> None:
        with contextlib.suppress(ValueError, OSError):  # closed by close()
            for line in iter(self.process.stdout.readline, ""):
                self.lines.put(line)
        self.lines.put("")

    def _until_ready(self, command: str, within: float) -> None:
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if not line:
                raise RuntimeError(f"forecast {command} exited early: {self.tail()}")
            if match := re.search(r"http:\s+(\S+)", line):
                self.http = match.group(1)
            if line.startswith("ready"):
                return
        raise RuntimeError(f"forecast {command} not ready within {within:.0f}s: {self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-chars:]

    def checks(self) -> dict[str, bool] | None:
        """/readyz's checks, or None when it does not answer 503 or 200."""
        try:
            response = httpx.get(f"{self.http}/readyz", timeout=15)
        except httpx.HTTPError:
            return None
        checks = response.json()["checks"]
        assert (response.status_code == 200) == all(checks.values())
        return checks

    def wait_exit(self, within: float) -> float:
        """Seconds until the process exited (at most ``within``)."""
        started = time.monotonic()
        self.process.wait(within)
        return time.monotonic() - started

    def terminate(self) -> float:
        """SIGTERM; the seconds until the process exited."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.monotonic() - started

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.log.close()


@pytest.fixture
def kafka(tmp_path: Path) -> Iterator[Broker]:
    running = Broker(tmp_path / "broker")
    running.start()
    yield running
    if running.process is not None:
        with contextlib.suppress(OSError, IndexError):  # it may be dead already
            running.freeze(False)
    running.stop()


def part_env(data_dir: Path, kafka: Broker, **extra: str) -> dict[str, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return base_env(
        data_dir,
        FORECAST_KAFKA_BOOTSTRAP=kafka.address,
        FORECAST_BATCH_MAX="50",
        FORECAST_STALL_TIMEOUT="3",
        **extra,
    )


def replay(env: dict[str, str], start: int, rows: int) -> None:
    done = run_cli(
        "replay", str(ETTH1), f"--start={start}", f"--limit={rows}", "--speed=0", env=env
    )
    assert done.returncode == 0, done.stderr


def one_step(env: dict[str, str], at_least: int, within: float = 90) -> int:
    deadline = time.monotonic() + within
    while True:
        out = run_cli("query", ONE_STEP, "--format", "csv", env=env)
        count = int(out.stdout.splitlines()[-1]) if out.returncode == 0 else -1
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.5)


def wait_checks(part: Part, consuming: bool, within: float) -> float:
    """Seconds until /readyz's ``consuming`` check reads ``consuming``."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        checks = part.checks()
        if checks is not None and checks["consuming"] is consuming:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"consuming never became {consuming}: {part.tail()}")


@pytest.mark.integration
def test_broker_restarted_empty_mid_stream_forecast_up_stops_then_a_restart_predicts(
    kafka: Broker, tmp_path: Path, record_property
) -> None:
    env = part_env(tmp_path / "up", kafka, FORECAST_STALL_EXIT="120")
    up = Part("up", env, tmp_path / "up.log")
    try:
        replay(env, 0, 100)
        assert one_step(env, 99 * 7) == 99 * 7
        checks = {"broker": True, "store": True, "sink": True, "model": True, "consuming": True}
        assert up.checks() == checks

        kafka.kill()
        noticed = wait_checks(up, consuming=False, within=30)
        record_property("stall_noticed_s", round(noticed, 1))
        print(f"\nstall noticed {noticed:.1f}s after the broker was killed (timeout 3s)")
        restarted = time.monotonic()
        kafka.start()  # on the same port, empty
        replay(env, 100, 50)  # sent while the old worker still runs: it must not skip them
        up.wait_exit(60)
        exited = time.monotonic() - restarted
        record_property("exit_after_restart_s", round(exited, 1))
        print(f"forecast up exited {exited:.1f}s after the broker came back")
        assert up.process.returncode == 1
        assert "error: the worker stopped: the broker lost its data" in up.tail()
    finally:
        up.close()

    # What its supervisor does: start it again. It starts afresh from what the broker
    # holds now, and the readings sent after the restart get their predictions.
    try:
        again = Part("up", env, tmp_path / "up.log", within=60)
    except RuntimeError as exc:
        if "No event received for active tp" in str(exc):  # Faust's recovery, waiting
            pytest.xfail(f"known: the restart hangs in Faust's table recovery: {exc}"[:2000])
        raise
    try:
        expected = 99 * 7 + 49 * 7  # each sensor's first reading after the reset: no forecast
        assert one_step(env, expected) == expected, again.tail()
        took = again.terminate()
        print(f"SIGTERM took {took:.1f}s")
        assert took < 10 and again.process.returncode == 0
    finally:
        again.close()


@pytest.mark.integration
def test_a_frozen_broker_turns_readiness_off_and_sigterm_still_ends_the_worker(
    kafka: Broker, tmp_path: Path, record_property
) -> None:
    env = part_env(tmp_path / "worker", kafka, FORECAST_STALL_EXIT="120")
    sink = Part("sink", env, tmp_path / "sink.log")  # stores what the worker publishes
    worker = Part("worker", env, tmp_path / "worker.log")
    try:
        replay(env, 0, 20)
        assert one_step(env, 19 * 7) == 19 * 7
        wait_checks(worker, consuming=True, within=10)
        kafka.freeze()  # requests hang: commits, heartbeats, the group leave on stop
        noticed = wait_checks(worker, consuming=False, within=30)
        record_property("stall_noticed_s", round(noticed, 1))
        print(f"\nfrozen broker: stall noticed after {noticed:.1f}s (timeout 3s)")
        took = worker.terminate()
        record_property("sigterm_s", round(took, 1))
        print(f"SIGTERM took {took:.1f}s with the broker frozen")
        assert took < 10, worker.tail()
    finally:
        worker.close()
        sink.close()


@pytest.mark.integration
def test_a_worker_stalled_past_the_limit_exits_non_zero_naming_the_cause(
    kafka: Broker, tmp_path: Path
) -> None:
    env = part_env(tmp_path / "worker", kafka, FORECAST_STALL_EXIT="6")
    sink = Part("sink", env, tmp_path / "sink.log")
    worker = Part("worker", env, tmp_path / "worker.log")
    try:
        replay(env, 0, 10)
        assert one_step(env, 9 * 7) == 9 * 7
        kafka.kill()  # and not started again
        exited = worker.wait_exit(40)
        print(f"\nstalled worker exited {exited:.1f}s after the broker was killed (limit 6s)")
        assert worker.process.returncode == 1
        tail = worker.tail()
        assert "error: the worker stopped: no progress for" in tail
        assert "FORECAST_STALL_EXIT=6" in tail and "did not answer" in tail
    finally:
        worker.close()
        sink.close()


@pytest.mark.integration
def test_sigterm_ends_a_worker_stuck_in_its_rebalance_with_the_broker_gone(
    kafka: Broker, tmp_path: Path, record_property
) -> None:
    env = part_env(tmp_path / "worker", kafka, FORECAST_STALL_EXIT="120")
    worker = Part("worker", env, tmp_path / "worker.log")
    try:
        kafka.kill()  # while it joins the group and recovers its table: it waits for good
        noticed = wait_checks(worker, consuming=False, within=30)
        print(f"\nstuck in its rebalance: stall noticed after {noticed:.1f}s (timeout 3s)")
        took = worker.terminate()
        record_property("sigterm_s", round(took, 1))
        print(f"SIGTERM took {took:.1f}s with the broker gone")
        assert took < 10, worker.tail()
        assert worker.process.returncode in (0, 1)  # 1: Faust was left behind, and said so
    finally:
        worker.close()

"""``forecast bench api``: the HTTP API under an open-loop load, beside a live stream.

Unless given ``--url`` and ``--key``, the bench starts ``forecast up --simulate N --rate R``
(a subprocess on a fresh data directory and free ports, the HTTP rate limit raised for
the run) and reads its URL and viewer key from what it prints. Scenarios then run one
after the other, each for ``duration`` seconds at a fixed arrival rate: request ``i`` is
due at ``start + i / rate`` whether or not earlier answers came back (open loop), sent
over a pool of keep-alive connections, and its latency is measured from when it was due,
so time spent waiting for a connection counts (no coordinated omission). The load comes
from asyncio and httpx in this process, not from locust: locust's users wait for their
answers (a closed loop) and its gevent would have to live in a process of its own.

Every answer is counted by status; a route that is missing (``POST /v1/forecast`` on an
older gateway) shows up as its error count, never as a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from forecast.errors import ForecastError

CONNECTIONS = 32  # keep-alive connections of the load generator
REQUEST_TIMEOUT = 10.0  # seconds; a request still unanswered then counts as an error
DRAIN = 10.0  # seconds to wait for answers after the last request was due
START_TIMEOUT = 120.0  # seconds for `forecast up` to print `ready`
FORECASTS_TIMEOUT = 120.0  # seconds for the stream's first forecasts to reach the API
BATCH = 100  # sensors in one batch forecast
LAG_NOTE = 5.0  # ms: a client lag worth saying beside the table
# where a started system must not go: a configured broker or store (it runs embedded)
ELSEWHERE = {"FORECAST_KAFKA_BOOTSTRAP", "FORECAST_CLICKHOUSE_URL", "FORECAST_BROKER_PORT"}


@dataclass(frozen=True)
class Scenario:
    name: str
    rate: float  # requests/s
    budget_ms: float | None  # p95 budget
    what: str


SCENARIOS = {
    "latest": Scenario("latest", 500.0, 20.0, "GET /v1/sensors/{id}/forecast"),
    "history": Scenario("history", 50.0, None, "GET /v1/sensors/{id}/forecasts?limit=100"),
    "forecast": Scenario("forecast", 100.0, 50.0, "POST /v1/forecast, 1 sensor"),
    "batch": Scenario("batch", 10.0, 150.0, f"POST /v1/forecast, {BATCH} sensors"),
}


@dataclass
class Result:
    scenario: Scenario
    target: float
    due: int = 0  # requests due in the run
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # of 2xx and 304 answers
    lags: list[float] = field(default_factory=list)  # the scheduler's lateness
    statuses: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def achieved(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else None

    def lag(self) -> float:
        """The load generator's own delay, p99 in ms (a busy client adds it to every
        latency; the latencies stay honest, but the server is not alone to blame)."""
        return float(np.percentile(self.lags, 99)) * 1000 if self.lags else 0.0

    def errors(self) -> str:
        bad = {s: n for s, n in self.statuses.items() if not _ok(s)}
        return ", ".join(f"{s} x{n}" for s, n in sorted(bad.items(), key=str)) or "none"

    def verdict(self) -> str:
        budget = self.scenario.budget_ms
        if budget is None:
            return "no budget"
        p95 = self.percentile(95)
        if p95 is None or self.ok < self.due:
            return f"p95 < {budget:g} ms: not met (errors)"
        met = p95 < budget and self.achieved >= 0.95 * self.target
        return f"p95 < {budget:g} ms at {self.target:g}/s: {'met' if met else 'missed'}"

    def to_json(self) -> dict:
        return {
            "scenario": self.scenario.name,
            "request": self.scenario.what,
            "target_per_s": self.target,
            "achieved_per_s": round(self.achieved, 1),
            "due": self.due,
            "ok": self.ok,
            "statuses": {str(s): n for s, n in self.statuses.items()},
            "p50_ms": _round(self.percentile(50)),
            "p95_ms": _round(self.percentile(95)),
            "p99_ms": _round(self.percentile(99)),
            "client_lag_p99_ms": _round(self.lag()),
            "budget_p95_ms": self.scenario.budget_ms,
            "verdict": self.verdict(),
        }


@dataclass
class Plan:
    scenarios: list[str]
    duration: float  # seconds per scenario
    stream_rate: float  # readings/s of the simulated stream
    sensors: int
    scale: float = 1.0  # times each scenario's request rate
    url: str | None = None
    key: str | None = None
    workers: int = 1  # worker processes of the started system (1: inside `forecast up`)


def parse_scenarios(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise ForecastError(f"--scenarios {text!r}: comma-separated, of {', '.join(SCENARIOS)}")
    return names


async def run(plan: Plan, progress: Callable[[str], None]) -> list[Result]:
    """Each scenario of the plan against the plan's system (or one started for it)."""
    with _system(plan, progress) as (url, key):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
        async with httpx.AsyncClient(
            base_url=url, headers=headers, limits=limits, timeout=REQUEST_TIMEOUT
        ) as client:
            sensors = await _sensors(client, plan.url is None, progress)
            results = []
            for name in plan.scenarios:
                scenario = SCENARIOS[name]
                rate = scenario.rate * plan.scale
                results.append(await _drive(client, scenario, rate, plan, sensors, progress))
            return results


async def _drive(
    client: httpx.AsyncClient,
    scenario: Scenario,
    rate: float,
    plan: Plan,
    sensors: list[str],
    progress: Callable[[str], None],
) -> Result:
    """Requests due at ``rate`` for ``plan.duration`` seconds, taken by ``CONNECTIONS``
    senders in turn (a request waits in this queue, not in httpx's pool, when every
    connection is busy); each is timed from when it was due."""
    result = Result(scenario, rate)
    request = _request(scenario.name, sensors)
    total = max(1, int(rate * plan.duration))
    queue: asyncio.Queue[float] = asyncio.Queue()
    in_flight = 0
    last_done = 0.0

    async def sender() -> None:
        nonlocal in_flight, last_done
        while True:
            due = await queue.get()
            in_flight += 1
            try:
                method, path, body = request()
                answer = await client.request(method, path, json=body)
                status: int | str = answer.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            finally:
                in_flight -= 1
            done = time.perf_counter()
            last_done = max(last_done, done)
            result.statuses[status] += 1
            if _ok(status):
                result.latencies.append(done - due)
            queue.task_done()

    senders = [asyncio.create_task(sender()) for _ in range(CONNECTIONS)]
    start = time.perf_counter() + 0.05
    shown = start
    try:
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.perf_counter()
            result.lags.append(now - due)
            queue.put_nowait(due)
            result.due += 1
            if now - shown >= 1.0:
                shown = now
                progress(
                    f"{scenario.name}: {now - start:4.1f}/{plan.duration:g}s, {result.due} due, "
                    f"{sum(result.statuses.values())} answered, {in_flight} in flight, "
                    f"{queue.qsize()} waiting for a connection"
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue.join(), DRAIN)
    finally:
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
    if queue.qsize():
        result.statuses["never sent"] += queue.qsize()
    if in_flight:
        result.statuses["unanswered"] += in_flight
    result.seconds = max(last_done, start + total / rate) - start
    progress(f"{scenario.name}: done, {result.ok} of {result.due} answered 2xx/304")
    return result


def _request(name: str, sensors: list[str]) -> Callable[[], tuple[str, str, object]]:
    pick = random.Random(0).choice
    batch = sensors[:BATCH]
    if name == "latest":
        return lambda: ("GET", f"/v1/sensors/{pick(sensors)}/forecast", None)
    if name == "history":
        return lambda: ("GET", f"/v1/sensors/{pick(sensors)}/forecasts?limit=100", None)
    if name == "forecast":
        return lambda: ("POST", "/v1/forecast", {"sensors": [pick(sensors)]})
    return lambda: ("POST", "/v1/forecast", {"sensors": batch})


async def _sensors(
    client: httpx.AsyncClient, started: bool, progress: Callable[[str], None]
) -> list[str]:
    """The sensors with a live forecast (waiting for the stream's first ones if the
    bench started the system)."""
    deadline = time.monotonic() + (FORECASTS_TIMEOUT if started else 0.0)
    while True:
        answer = await client.get("/v1/sensors")
        if answer.status_code != 200:
            raise ForecastError(f"GET /v1/sensors answered {answer.status_code}: {answer.text}")
        found = [s["sensor_id"] for s in answer.json()["sensors"]]
        if found or time.monotonic() > deadline:
            break
        progress("waiting for the stream's first forecasts...")
        await asyncio.sleep(1.0)
    if not found:
        raise ForecastError("no sensor has a live forecast: is a stream running?")
    return found


@contextlib.contextmanager
def _system(plan: Plan, progress: Callable[[str], None]) -> Iterator[tuple[str, str | None]]:
    """The plan's URL and key, or a `forecast up` started for the bench (stopped after)."""
    if plan.url is not None:
        yield plan.url.rstrip("/"), plan.key
        return
    with tempfile.TemporaryDirectory(prefix="bench-api-") as folder:
        env = {k: v for k, v in os.environ.items() if k not in ELSEWHERE}
        env.update(
            FORECAST_DATA_DIR=folder,
            FORECAST_HTTP_PORT="0",
            FORECAST_WS_PORT="0",
            FORECAST_RATE_HTTP="1000000/second",
            FORECAST_RETRAIN="false",
            FORECAST_LOG_LEVEL="WARNING",
        )
        args = ["up", "--simulate", str(plan.sensors), "--rate", f"{plan.stream_rate:g}"]
        args += ["--workers", str(plan.workers)]
        progress(f"starting forecast {' '.join(args)}...")
        with (Path(folder) / "up.log").open("w") as log:
            process = subprocess.Popen(  # noqa: S603  # this interpreter, fixed arguments
                [sys.executable, "-m", "forecast", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            try:
                yield _announced(process, Path(folder) / "up.log")
            finally:
                _stop(process)


def _announced(process: subprocess.Popen, log: Path) -> tuple[str, str | None]:
    """The HTTP URL and the viewer key that `forecast up` prints before `ready`."""
    lines: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        line = process.stdout.readline() if process.stdout else ""
        if not line:
            raise ForecastError(f"forecast up exited early: {log.read_text()[-2000:]}")
        lines.append(line)
        if line.startswith("ready"):
            text = "".join(lines)
            url = re.search(r"http:\s+(\S+)", text)
            token = re.search(r"token=([^&\s]+)", text)
            if url is None:
                raise ForecastError("forecast up printed no HTTP URL")
            return url.group(1).rstrip("/"), token.group(1) if token else None
    raise ForecastError(f"forecast up was not ready within {START_TIMEOUT:g}s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout:
        process.stdout.close()


def table(results: list[Result]) -> list[str]:
    """One row per scenario: rates, answers, percentiles, the budget beside them."""
    head = (
        f"{'scenario':<10}{'target/s':>9}{'achieved/s':>11}{'due':>7}{'ok':>7}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}  budget / errors"
    )
    rows = [head]
    for r in results:
        p = [r.percentile(q) for q in (50, 95, 99)]
        cells = "".join(f"{'-' if v is None else f'{v:.1f}':>9}" for v in p)
        rows.append(
            f"{r.scenario.name:<10}{r.target:>9g}{r.achieved:>11.1f}{r.due:>7}{r.ok:>7}"
            f"{cells}  {r.verdict()}; errors: {r.errors()}"
        )
    rows.append("requests: " + "; ".join(f"{r.scenario.name} = {r.scenario.what}" for r in results))
    lagging = [f"{r.scenario.name} {r.lag():.1f} ms" for r in results if r.lag() > LAG_NOTE]
    if lagging:
        rows.append(
            "the load generator itself sent late (p99, included in the latencies above): "
            + ", ".join(lagging)
        )
    return rows


def _ok(status: int | str) -> bool:
    return isinstance(status, int) and (200 <= status < 300 or status == 304)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)

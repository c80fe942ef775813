"""``forecast bench memory``: resident memory of a worker process holding state for many
sensors, with both models loaded (the trained LSTM in production, a TFT as shadow: its
weights fresh, memory does not depend on them).

The worker is ``forecast worker`` under ``WorkerPool`` (as ``forecast up --workers N``
runs it), on a fresh data directory and registry; the broker runs in this process. First
every sensor's window is filled fast: one record of a sensor's whole history each. Then,
for ``minutes``, one reading per sensor per round (records of 100 readings), at the
worker's pace (at most two rounds ahead of its commits). The worker's resident memory is
sampled from ``/proc`` every few seconds throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bench.serving import (
    Commits,
    Produced,
    Served,
    bench_settings,
    guarded,
    history,
    install,
    produce,
    quiet,
    rounds,
    rss_mib,
    wait_committed,
    worker_env,
)
from forecast.runtime import start_broker
from forecast.settings import Settings
from forecast.workers import WorkerPool

Progress = Callable[[str, float, float], None]  # phase, minutes, MiB


@dataclass
class Memory:
    sensors: int
    fill: Produced = field(default_factory=Produced)
    fill_seconds: float = 0.0
    rounds: int = 0
    readings: int = 0  # after the fill
    seconds: float = 0.0  # after the fill
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MiB)
    fill_index: int = 0  # the first sample with every window full
    pids: set[int] = field(default_factory=set)  # more than one: the worker restarted

    @property
    def steady(self) -> np.ndarray:
        """(minutes since the fill, MiB) of the samples once every window was full."""
        rows = np.array(self.samples[self.fill_index :] or [(0.0, 0.0)])
        return np.column_stack([(rows[:, 0] - rows[0, 0]) / 60, rows[:, 1]])

    @property
    def slope(self) -> float:
        """MiB per minute, least squares over the steady samples."""
        rows = self.steady
        if len(rows) < 2 or rows[-1, 0] <= 0:
            return 0.0
        return float(np.polyfit(rows[:, 0], rows[:, 1], 1)[0])

    @property
    def peak(self) -> float:
        return max(mib for _, mib in self.samples)


async def memory(
    sensors: int,
    minutes: float,
    served: Served,
    interval: float = 2.0,
    progress: Progress | None = None,
) -> Memory:
    report = Memory(sensors)
    with tempfile.TemporaryDirectory() as folder:
        settings = bench_settings(folder, kafka_session_timeout=2)
        install(settings, served)
        async with contextlib.AsyncExitStack() as stack:
            bootstrap = await start_broker(stack, settings, quiet)
            stack.enter_context(worker_env(settings))
            pool = WorkerPool(settings, bootstrap, 1)
            stack.push_async_callback(pool.stop)
            await pool.start()
            sampling = asyncio.create_task(_sample(pool, report, interval, progress))
            try:
                await guarded(_fill(bootstrap, settings, report, served.window), pool)
                report.fill_index = len(report.samples)
                steady = _steady(bootstrap, settings, report, served.window, minutes)
                await guarded(steady, pool)
                await asyncio.sleep(interval)  # a sample after the last round
            finally:
                sampling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampling
    report.fill_index = min(report.fill_index, len(report.samples) - 1)
    return report


async def _sample(
    pool: WorkerPool, report: Memory, interval: float, progress: Progress | None
) -> None:
    started = time.perf_counter()
    while True:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            pid = pool.pids()[0]
            mib = rss_mib(pid)
            report.pids.add(pid)
            elapsed = time.perf_counter() - started
            report.samples.append((elapsed, mib))
            if progress:
                phase = "steady" if report.fill_index else "filling"
                progress(phase, elapsed / 60, mib)
        await asyncio.sleep(interval)


async def _fill(bootstrap: str, settings: Settings, report: Memory, window: int) -> None:
    """Every sensor's window, one record of its history each, until committed."""
    started = time.perf_counter()
    topic = settings.topic("readings")
    records = history(
        range(report.sensors), range(window), window, "mem", block=min(100, report.sensors)
    )
    report.fill = await produce(bootstrap, [topic], records)
    group = settings.topic(settings.worker_app)
    await wait_committed(bootstrap, group, topic, report.fill.records)
    report.fill_seconds = time.perf_counter() - started


async def _steady(
    bootstrap: str, settings: Settings, report: Memory, window: int, minutes: float
) -> None:
    """One reading per sensor per round for ``minutes``, at most two rounds ahead of
    what the worker has committed."""
    topic = settings.topic("readings")
    group = settings.topic(settings.worker_app)
    async with Commits(bootstrap, group, topic) as commits:
        started, ends = time.perf_counter(), [report.fill.records]
        while time.perf_counter() - started < minutes * 60 or report.rounds == 0:
            step = window + report.rounds
            records = rounds(report.sensors, range(step, step + 1), 100, 1 << 40, "mem")
            sent = await produce(bootstrap, [topic], records)
            report.rounds += 1
            report.readings += sent.readings
            ends.append(ends[-1] + sent.records)
            if len(ends) > 2:
                await commits.reach(ends[-3])
        await commits.reach(ends[-1])
        report.seconds = time.perf_counter() - started

"""``forecast bench restore``: a worker's state back after a restart.

A worker (the wiring of ``forecast up``: the registry's LSTM in production, the baseline
as fallback) takes a full window of history for every sensor (one record of a sensor's
history each) and is stopped gracefully once it has committed them. One more reading per
sensor is produced; then a new worker starts on the same data directory and app id. The
restore time runs from its start until a prediction of every sensor's new reading is on
``predictions``: joining the group, recovering the state from the changelog, and
processing the readings.

The check: a reference worker (topic prefix ``ref.``, a data directory and registry of its
own with the same artifact) takes the same readings of a sample of the sensors without
interruption; its forecasts of the new readings must be those of the restarted worker.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.serving import (
    START,
    STEP,
    Produced,
    Served,
    Tail,
    bench_settings,
    end_offsets,
    epoch,
    guarded,
    history,
    install,
    produce,
    quiet,
    rounds,
    wait_committed,
)
from forecast.runtime import start_broker, start_worker
from forecast.settings import Settings

TOLERANCE = 1e-4  # float32 forecasts of batches of other sizes, relative


@dataclass
class Restore:
    sensors: int
    fill: Produced
    fill_seconds: float  # the first worker's start to its commit of the history
    seconds: float  # the new worker's start to the last sensor's prediction
    predicted: int  # sensors whose new reading got a prediction within the timeout
    served: Counter  # those predictions by model
    sample: int  # sensors the reference worker took
    matched: int  # sample sensors whose forecasts agree
    max_diff: float  # the largest relative difference of a forecast step in the sample


async def restore(
    sensors: int, served: Served, sample: int = 100, limit_s: float = 600.0
) -> Restore:
    with tempfile.TemporaryDirectory() as folder:
        settings = bench_settings(Path(folder) / "worker", kafka_session_timeout=2)
        install(settings, served)
        window = served.window
        async with contextlib.AsyncExitStack() as stack:
            bootstrap = await start_broker(stack, settings, quiet)
            fill, fill_seconds = await _fill(bootstrap, settings, sensors, window)
            new = rounds(sensors, range(window, window + 1), 100, sensors)
            await produce(bootstrap, [settings.topic("readings")], new)
            seconds, restarted = await _restart(bootstrap, settings, sensors, window, limit_s)
            picked = list(range(0, sensors, max(1, sensors // sample)))[:sample]
            where = Path(folder) / "reference"
            reference = await _reference(bootstrap, where, served, picked, window, limit_s)
    matched, max_diff = _compare(restarted, reference)
    models = Counter(m["model"] for m in restarted.values())
    return Restore(
        sensors,
        fill,
        fill_seconds,
        seconds,
        len(restarted),
        models,
        len(reference),
        matched,
        max_diff,
    )


async def _fill(
    bootstrap: str, settings: Settings, sensors: int, window: int
) -> tuple[Produced, float]:
    """A worker takes every sensor's window and stops once it has committed it."""
    topic = settings.topic("readings")
    fill = await produce(
        bootstrap, [topic], history(range(sensors), range(window), window, block=min(100, sensors))
    )
    async with contextlib.AsyncExitStack() as stack:
        started = time.perf_counter()
        worker = await start_worker(stack, settings, bootstrap)
        group = settings.topic(settings.worker_app)
        await guarded(wait_committed(bootstrap, group, topic, fill.records), worker)
        seconds = time.perf_counter() - started
    return fill, seconds


async def _restart(
    bootstrap: str, settings: Settings, sensors: int, window: int, limit_s: float
) -> tuple[float, dict[str, dict]]:
    """A new worker on the same data directory and app: seconds from its start until
    every sensor's reading number ``window`` has a prediction; those predictions."""
    async with (
        _Predictions(bootstrap, settings, window) as predictions,
        contextlib.AsyncExitStack() as stack,
    ):
        started = time.perf_counter()
        await start_worker(stack, settings, bootstrap)
        got = await predictions.until(sensors, started + limit_s)
        seconds = time.perf_counter() - started
    return seconds, got


class _Predictions:
    """Predictions of every sensor's reading number ``window``, on the settings'
    ``predictions`` topic from its end when entered."""

    def __init__(self, bootstrap: str, settings: Settings, window: int) -> None:
        self.bootstrap = bootstrap
        self.topic = settings.topic("predictions")
        self.wanted = START + STEP * window
        self.tail = Tail(bootstrap, self.topic)

    async def __aenter__(self) -> _Predictions:
        await self.tail.start(await end_offsets(self.bootstrap, self.topic))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.tail.stop()

    async def until(self, sensors: int, deadline: float) -> dict[str, dict]:
        """Those of ``sensors`` sensors, or what came before ``deadline`` (perf_counter)."""
        got: dict[str, dict] = {}
        while len(got) < sensors and time.perf_counter() < deadline:
            for message in await self.tail.take(50):
                if epoch(message["ts"]) == self.wanted:
                    got[message["sensor_id"]] = message
        return got


async def _reference(
    bootstrap: str, where: Path, served: Served, picked: list[int], window: int, limit_s: float
) -> dict[str, dict]:
    """A worker of its own that takes the picked sensors' readings without a restart."""
    settings = bench_settings(
        where, kafka_bootstrap=bootstrap, kafka_session_timeout=2, topic_prefix="ref."
    )
    install(settings, served)
    async with contextlib.AsyncExitStack() as stack:
        await start_broker(stack, settings, quiet)  # the engine's topics, with the prefix
        topic = [settings.topic("readings")]
        await produce(bootstrap, topic, history(picked, range(window), window))
        await produce(bootstrap, topic, history(picked, range(window, window + 1), 1))
        async with _Predictions(bootstrap, settings, window) as predictions:
            await start_worker(stack, settings, bootstrap)
            return await predictions.until(len(picked), time.perf_counter() + limit_s)


def _compare(restarted: dict[str, dict], reference: dict[str, dict]) -> tuple[int, float]:
    """Sample sensors whose forecasts agree, and the largest relative difference."""
    matched, worst = 0, 0.0
    for sensor, expected in reference.items():
        got = restarted.get(sensor)
        if got is None or got["model"] != expected["model"]:
            worst = math.inf
            continue
        pairs = zip(got["yhat"], expected["yhat"], strict=True)
        diff = max(abs(a - b) / max(1.0, abs(b)) for a, b in pairs)
        worst = max(worst, diff)
        matched += diff <= TOLERANCE
    return matched, worst

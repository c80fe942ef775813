"""``forecast bench memory``: resident memory of a worker's processing with both models
loaded (an LSTM in production, a TFT as shadow) holding state for many sensors.

Readings go through the worker's own batch processor (validation, per-sensor state, both
models, the baseline, residuals, drift) one round at a time: one reading per sensor.
The state is kept as the worker keeps it: live objects in its cache (their snapshots go
to the changelog). Network weights are untrained: memory does not depend on them.
Resident memory is sampled after every round.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from forecast.settings import Settings
from models.base import ModelSet
from models.baseline import SeasonalNaive
from models.lstm import LinearLSTMNet, LSTMForecaster
from models.tft import TFTConfig, TFTForecaster, build_network
from streams.drift import DriftMonitor
from streams.pipeline import BatchProcessor, RawRecord
from streams.residuals import ResidualTracker
from streams.state import SensorState
from streams.validate import Limits

START = 1_700_000_000.0


@dataclass
class Memory:
    sensors: int
    rounds: int = 0
    seconds: float = 0.0
    state_bytes: int = 0
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MiB)
    fill_index: int = 0  # the sample taken when every window was full

    @property
    def filled(self) -> float:
        return self.samples[self.fill_index][1]

    @property
    def final(self) -> float:
        return self.samples[-1][1]

    @property
    def peak(self) -> float:
        return max(mib for _, mib in self.samples)


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def run(
    settings: Settings,
    sensors: int,
    minutes: float,
    tft_cadence: int,
    progress: Callable[[int, float], None] | None = None,
) -> Memory:
    lstm = LSTMForecaster(LinearLSTMNet(336, 24, 64), 1, [1.0] * 24)
    tft_config = TFTConfig(horizon=24, cadence=tft_cadence)
    tft = TFTForecaster(build_network(tft_config), 1, tft_config)
    tft.name = "tft"
    models = ModelSet(SeasonalNaive(horizon=24, season=24), lstm, tft)
    states: dict[str, SensorState] = {}  # the worker's cache of live states
    processor = BatchProcessor(
        lambda: models,
        Limits(max_batch_readings=sensors),
        settings.allowed_lateness,
        states.get,
        tracker=ResidualTracker(settings.horizons),
        drift=DriftMonitor(settings.drift_config()),
    )
    fill = 336 + 1  # readings before the longest window (the LSTM's) is full
    report = Memory(sensors)
    started = time.perf_counter()
    while True:
        batch = [
            {
                "sensor_id": f"mem.{s}",
                "ts": START + 3600.0 * report.rounds,
                "value": math.sin(report.rounds / 24 * 2 * math.pi) + s % 7,
            }
            for s in range(sensors)
        ]
        records = [
            RawRecord("readings", 0, report.rounds * 100 + i, None, orjson.dumps(batch[i::100]))
            for i in range(min(100, sensors))
        ]
        result = processor.process(records)
        for sensor_id, (_, state) in result.touched.items():
            states[sensor_id] = state
            state.to_bytes()  # the snapshot the worker logs to the changelog
        report.rounds += 1
        elapsed = time.perf_counter() - started
        report.samples.append((elapsed, rss_mib()))
        if report.rounds == fill:
            report.fill_index = len(report.samples) - 1
        if progress:
            progress(report.rounds, report.samples[-1][1])
        filled_at = report.samples[report.fill_index][0]
        if report.rounds > fill and elapsed - filled_at > minutes * 60:
            break
    report.seconds = time.perf_counter() - started
    report.state_bytes = sum(len(state.to_bytes()) for state in states.values())
    return report

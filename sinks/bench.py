"""``forecast bench sink``: rows per second into a fresh chDB store, in realistic batches."""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from forecast.schemas import Prediction, Reading
from forecast.settings import load_settings
from sinks.clickhouse import Store


@dataclass
class SinkBench:
    batches: int
    readings: int
    prediction_rows: int
    seconds: float
    flush_p50: float
    flush_p99: float

    @property
    def rows_per_second(self) -> float:
        return (self.readings + self.prediction_rows) / self.seconds


def run(batches: int, batch_readings: int, horizon: int, sensors: int, seed: int = 0) -> SinkBench:
    """Each batch: ``batch_readings`` readings and one ``horizon``-step prediction each,
    stored with ``write_batch`` as the worker does (row building included)."""
    rng = random.Random(seed)
    flushes = []
    with tempfile.TemporaryDirectory() as folder:
        store = Store.open(load_settings(data_dir=Path(folder)))
        try:
            t0 = 1.6e9
            for b in range(batches):
                readings, predictions = [], []
                for i in range(batch_readings):
                    sensor = f"bench.{i % sensors:05d}"
                    ts = t0 + 60 * (b * batch_readings + i) // sensors
                    value = rng.gauss(10, 2)
                    readings.append(Reading(sensor, ts, value))
                    yhat = [value + rng.gauss(0, 1) for _ in range(horizon)]
                    predictions.append(
                        Prediction(
                            sensor,
                            ts,
                            time.time(),
                            "lstm",
                            1,
                            60.0,
                            yhat,
                            [y - 1 for y in yhat],
                            [y + 1 for y in yhat],
                            b * batch_readings + i,
                        )
                    )
                started = time.perf_counter()
                store.write_batch(readings, predictions, token=f"bench-{b}")
                flushes.append(time.perf_counter() - started)
        finally:
            store.close()
    flushes.sort()
    return SinkBench(
        batches,
        batches * batch_readings,
        batches * batch_readings * horizon,
        sum(flushes),
        statistics.median(flushes),
        flushes[min(len(flushes) - 1, int(len(flushes) * 0.99))],
    )

"""``forecast bench sink``: the ClickHouse sink's rate, from the ``store`` topic into chDB.

Worker-sized batches (readings, each with one prediction of ``horizon`` steps) are
encoded as the worker encodes them (:mod:`sinks.batches`) and produced to the embedded
broker first; then the real sink (:class:`sinks.consumer.Sink`, its consumer group, its
columnar inserts and commits) stores them into a fresh chDB store, timed from its first
fetch to the last row stored.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaProducer

from forecast.schemas import Prediction, Reading
from forecast.settings import load_settings
from sinks.batches import batch_tables, encode_chunks
from sinks.clickhouse import Store
from sinks.consumer import Sink
from streams.broker import EmbeddedBroker, ensure_topics


@dataclass
class SinkBench:
    batches: int
    readings: int
    predictions: int
    horizon: int
    records: int
    encode_seconds: float  # the worker's share: Arrow tables and IPC records
    seconds: float  # the sink's: fetch, decode, insert, commit

    @property
    def predictions_per_second(self) -> float:
        return self.predictions / self.seconds

    @property
    def rows_per_second(self) -> float:
        return (self.readings + self.predictions) / self.seconds


def batches(count: int, batch_readings: int, horizon: int, sensors: int, seed: int = 0):
    """``count`` batches of readings, each reading with one prediction."""
    rng = random.Random(seed)
    now = time.time()
    for b in range(count):
        readings, predictions = [], []
        for i in range(batch_readings):
            n = b * batch_readings + i
            sensor, ts, value = (
                f"bench.{i % sensors:05d}",
                1.6e9 + 60.0 * (n // sensors),
                rng.gauss(10, 2),
            )
            yhat = [value + rng.gauss(0, 1) for _ in range(horizon)]
            readings.append(Reading(sensor, ts, value))
            predictions.append(
                Prediction(
                    sensor,
                    ts,
                    now,
                    "lstm",
                    1,
                    60.0,
                    yhat,
                    [y - 1 for y in yhat],
                    [y + 1 for y in yhat],
                    n,
                )
            )
        yield readings, predictions


async def measure(count: int, batch_readings: int, horizon: int, sensors: int) -> SinkBench:
    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(data_dir=Path(folder), topic_prefix="bench.", kafka_partitions=4)
        async with EmbeddedBroker() as broker:
            await ensure_topics(broker.bootstrap, settings)
            producer = AIOKafkaProducer(
                bootstrap_servers=broker.bootstrap, max_request_size=4 << 20, linger_ms=5
            )
            await producer.start()
            records, encoding = 0, 0.0
            try:
                for b, (readings, predictions) in enumerate(
                    batches(count, batch_readings, horizon, sensors)
                ):
                    started = time.perf_counter()
                    chunks = [
                        (name, chunk)
                        for name, table in batch_tables(readings, predictions).items()
                        for chunk in encode_chunks(table)
                    ]
                    encoding += time.perf_counter() - started
                    for name, chunk in chunks:
                        await producer.send(settings.topic(f"store.{name}"), chunk, partition=b % 4)
                        records += 1
                await producer.flush()
            finally:
                await producer.stop()
            store = await asyncio.to_thread(Store.open, settings)
            sink = Sink(settings, broker.bootstrap, store)
            try:
                await sink.start()
                expected = count * batch_readings
                started = None
                while True:  # polls the store: what is measured is the sink, not an event
                    if started is None and sink.consumer.assignment():
                        started = time.perf_counter()
                    stored = await asyncio.to_thread(
                        store.query,
                        "SELECT count() FROM forecast.predictions_log",
                        None,
                        {"final": 0},
                    )
                    if started is not None and stored[0][0] >= expected:
                        break
                    await asyncio.sleep(0.1)
                seconds = time.perf_counter() - started
            finally:
                await sink.stop()
                store.close()
    return SinkBench(count, expected, expected, horizon, records, encoding, seconds)


def run(count: int, batch_readings: int, horizon: int, sensors: int) -> SinkBench:
    return asyncio.run(measure(count, batch_readings, horizon, sensors))

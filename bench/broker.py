"""``forecast bench broker``: how long one pass through the broker takes, and the pieces
the latency bench shares with it.

Readings stamped with the wall clock go out at a steady rate, one per request (as a
sensor feed with ``linger_ms=0`` sends them), to a raw aiokafka consumer with the
worker's fetch wait; the delay of a reading is its arrival minus its stamp. The run is
repeated after topping the topic up to each count of record batches already stored, so
a broker whose fetches cost more as a topic grows shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.serving import bench_settings, create_topic, quiet
from forecast.kafka import FETCH_WAIT_MS
from forecast.runtime import start_broker


@dataclass
class Delays:
    """Percentiles of delays in seconds (NaN where none were seen)."""

    count: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, delays: list[float]) -> Delays:
        values = np.array(delays) if delays else np.array([math.nan])
        p50, p99 = np.percentile(values, [50, 99]).tolist()
        return cls(len(delays), p50, p99, float(values.max()))


class BrokerHop:
    """A raw aiokafka consumer of a topic's new readings: the delay of one pass through
    the broker, with the worker's fetch wait (records that are lists of readings, such
    as the latency bench's history, are passed over)."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self.seen: list[tuple[float, float]] = []  # (reading's stamp, taken at)
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, bootstrap: str, topic: str) -> BrokerHop:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, fetch_max_wait_ms=FETCH_WAIT_MS, enable_auto_commit=False
        )
        await consumer.start()
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the positions now: nothing sent later is missed
            await consumer.position(tp)
        return cls(consumer)

    async def _read(self) -> None:
        while True:
            for records in (await self.consumer.getmany(timeout_ms=200)).values():
                now = time.time()
                readings = [orjson.loads(r.value) for r in records]
                self.seen += [(r["ts"], now) for r in readings if isinstance(r, dict)]

    async def stop(self, since: float) -> Delays:
        """Stop reading; the delays of the readings stamped from ``since`` on."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.consumer.stop()
        return Delays.of([taken - ts for ts, taken in self.seen if ts >= since])


async def steady(
    producer: AIOKafkaProducer, topic: str, rate: float, sensors: int, numbers: range
) -> int:
    """Send readings number ``numbers`` at ``rate`` per second, stamped with the clock."""
    started = time.perf_counter()
    for i, n in enumerate(numbers):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sensor = n % sensors
        reading = {
            "sensor_id": f"lat.{sensor}",
            "ts": time.time(),
            "value": sensor % 7 + math.sin(n / sensors / 24 * 2 * math.pi),
        }
        await producer.send(topic, orjson.dumps(reading), reading["sensor_id"].encode())
    await producer.flush()
    return len(numbers)


async def broker_hops(
    rate: float,
    seconds: float,
    stored: Sequence[int],
    sensors: int = 1000,
    say: Callable[[str], None] = quiet,
) -> dict[int, Delays]:
    """One pass through the broker at ``rate`` for ``seconds``, once the topic holds at
    least each count of ``stored`` records (one record batch each; the runs before stay
    in the topic and count too). Returns the delays by the records held before each run."""
    results: dict[int, Delays] = {}
    with tempfile.TemporaryDirectory() as folder:
        settings = bench_settings(folder)
        async with contextlib.AsyncExitStack() as stack:
            bootstrap = await start_broker(stack, settings, quiet)
            topic = f"bench-hop-{uuid.uuid4().hex[:8]}"
            await create_topic(bootstrap, topic, settings.kafka_partitions)
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
            await producer.start()
            stack.push_async_callback(producer.stop)
            written = 0
            for count in sorted(stored):
                if count > written:
                    say(f"storing {count - written} records, one per batch (up to {count})...")
                for n in range(written, count):  # one record per request: a batch each
                    await producer.send_and_wait(topic, b"[]", f"lat.{n % sensors}".encode())
                written = max(written, count)
                hop = await BrokerHop.start(bootstrap, topic)
                since = time.time()
                sent = await steady(producer, topic, rate, sensors, range(int(rate * seconds)))
                await asyncio.sleep(1.0)
                results[written] = await hop.stop(since)
                written += sent
    return results

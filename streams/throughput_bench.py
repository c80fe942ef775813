"""``forecast bench throughput`` and ``forecast bench latency``, in one process on an
embedded broker.

Throughput: the same records are read by a raw aiokafka consumer (``getmany`` + orjson),
by a plain Faust agent (iterates the stream, decodes each value), and by the engine's
worker (validation, per-sensor state, the baseline forecast, residuals and drift,
ClickHouse, publication). Each is timed from its first record to its last, so consumer
group joins do not count.

Latency: readings stamped with the wall clock when produced, at a steady rate over many
sensors, through the worker and a gateway to a websocket subscriber; the latency of a
prediction is its arrival time minus its reading's time.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import faust
import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from websockets.asyncio.client import connect
from yarl import URL

from forecast.settings import Settings, load_settings
from gateway.auth import Authenticator, KeyStore
from gateway.feed import Feed
from gateway.hub import Hub
from gateway.ws import StreamServer
from models.baseline import SeasonalNaive
from sinks.clickhouse import Store
from streams.broker import EmbeddedBroker, ensure_topics
from streams.pipeline import ModelSet
from streams.transport import Transport
from streams.worker import Worker

START = 1_700_000_000.0


@dataclass
class Throughput:
    readings: int
    records: int
    produced_seconds: float
    raw_seconds: float
    faust_seconds: float
    engine_seconds: float

    def per_second(self, seconds: float) -> float:
        return self.readings / seconds if seconds > 0 else math.inf


def _settings(folder: str, **overrides: object) -> Settings:
    return load_settings(data_dir=Path(folder), retrain=False, auth=False, **overrides)


async def throughput(readings: int, per_record: int, sensors: int, horizon: int) -> Throughput:
    with tempfile.TemporaryDirectory() as folder:
        settings = _settings(folder, horizon=horizon, kafka_session_timeout=2)
        async with EmbeddedBroker() as broker:
            await ensure_topics(broker.bootstrap, settings)
            topic = settings.topic("readings")
            started = time.perf_counter()
            records = await _produce(broker.bootstrap, topic, readings, per_record, sensors)
            produced = time.perf_counter() - started
            raw = await _raw(broker.bootstrap, topic, records)
            plain = await _plain_faust(broker.bootstrap, topic, records, settings)
            engine = await _engine(broker.bootstrap, settings, readings)
    return Throughput(readings, records, produced, raw, plain, engine)


async def _produce(bootstrap: str, topic: str, readings: int, per_record: int, sensors: int):
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, acks=1
    )
    await producer.start()
    try:
        sent, records, pending = 0, 0, []
        while sent < readings:
            count = min(per_record, readings - sent)
            batch = [
                {
                    "sensor_id": f"bench.{(sent + i) % sensors}",
                    "ts": START + 60.0 * ((sent + i) // sensors),
                    "value": math.sin((sent + i) / 97.0),
                }
                for i in range(count)
            ]
            key = batch[0]["sensor_id"].encode()
            value = orjson.dumps(batch if per_record > 1 else batch[0])
            pending.append(await producer.send(topic, value, key))
            sent, records = sent + count, records + 1
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return records


async def _raw(bootstrap: str, topic: str, records: int) -> float:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        seen, first = 0, None
        while seen < records:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for batch in batches.values():
                first = first or time.perf_counter()
                for record in batch:
                    orjson.loads(record.value)
                seen += len(batch)
        return time.perf_counter() - first
    finally:
        await consumer.stop()


async def _plain_faust(bootstrap: str, topic: str, records: int, settings: Settings) -> float:
    loop = asyncio.get_running_loop()
    app = faust.App(
        f"bench-plain-{uuid.uuid4().hex[:8]}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_partitions=settings.kafka_partitions,
        broker_session_timeout=settings.kafka_session_timeout,
        broker_heartbeat_interval=settings.kafka_session_timeout / 6,
        loop=loop,
    )
    app.transport = Transport([URL(f"kafka://{bootstrap}")], app, loop=loop)
    source = app.topic(
        topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    done, marks = asyncio.Event(), {"seen": 0, "first": 0.0}

    async def agent(stream: faust.StreamT) -> None:
        async for value in stream:
            if marks["seen"] == 0:
                marks["first"] = time.perf_counter()
            orjson.loads(value)
            marks["seen"] += 1
            if marks["seen"] == records:
                done.set()

    app.agent(source, name="plain")(agent)
    await app.start()
    try:
        await asyncio.wait_for(done.wait(), 600)
        return time.perf_counter() - marks["first"]
    finally:
        await app.stop()


async def _engine(bootstrap: str, settings: Settings, readings: int) -> float:
    store = await asyncio.to_thread(Store.open, settings)
    baseline = ModelSet(SeasonalNaive(horizon=settings.horizon, season=settings.season))
    worker = Worker(settings, bootstrap, store, lambda: baseline)
    handle, marks, done = worker.handle, {"seen": 0, "first": 0.0}, asyncio.Event()

    async def counting(events):
        if marks["seen"] == 0:
            marks["first"] = time.perf_counter()
        result = await handle(events)
        marks["seen"] += result.outcomes["accepted"]
        if marks["seen"] >= readings:
            done.set()
        return result

    worker.handle = counting
    await worker.start()
    try:
        await asyncio.wait_for(done.wait(), 1800)
        return time.perf_counter() - marks["first"]
    finally:
        await worker.stop()
        store.close()


@dataclass
class Latency:
    sent: int
    received: int
    p50: float
    p99: float
    max: float


async def latency(rate: float, sensors: int, seconds: float) -> Latency:
    """Readings at ``rate`` per second over ``sensors``; latency at a subscriber."""
    with tempfile.TemporaryDirectory() as folder:
        settings = _settings(folder, kafka_session_timeout=2)
        async with EmbeddedBroker() as broker:
            await ensure_topics(broker.bootstrap, settings)
            store = await asyncio.to_thread(Store.open, settings)
            baseline = ModelSet(SeasonalNaive(horizon=settings.horizon, season=settings.season))
            worker = Worker(settings, broker.bootstrap, store, lambda: baseline)
            hub = Hub(settings.replay_buffer)
            feed = Feed(settings, broker.bootstrap, hub)
            auth = Authenticator(KeyStore(Path(folder) / "keys.db"), enabled=False)
            server = StreamServer(hub, auth, "127.0.0.1", 0, settings.ws_queue_size)
            await worker.start()
            await feed.start()
            await server.start()
            try:
                return await _measure(
                    broker.bootstrap, settings, server.port, rate, sensors, seconds
                )
            finally:
                await server.stop()
                await feed.stop()
                await worker.stop()
                store.close()


async def _measure(
    bootstrap: str, settings: Settings, port: int, rate: float, sensors: int, seconds: float
) -> Latency:
    delays: list[float] = []
    async with connect(f"ws://127.0.0.1:{port}/v1/stream", max_queue=None) as ws:
        await ws.send(orjson.dumps({"op": "subscribe", "sensors": ["*"]}).decode())
        await ws.recv()  # subscribed

        async def receive() -> None:
            async for frame in ws:
                message = orjson.loads(frame)
                if message.get("type") == "prediction":
                    sent = _epoch(message["ts"])
                    if sent >= warm_until:
                        delays.append(time.time() - sent)

        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
        await producer.start()
        # Two readings per sensor before timing: a sensor's first reading has no forecast,
        # and the consumer group joins meanwhile.
        warm_until = time.time() + 1e9
        receiving = asyncio.create_task(receive())
        topic = settings.topic("readings")
        await _steady(producer, topic, rate, sensors, range(2 * sensors))
        await asyncio.sleep(settings.kafka_session_timeout + 2)
        warm_until = time.time()
        sent = await _steady(
            producer, topic, rate, sensors, range(2 * sensors, 2 * sensors + int(rate * seconds))
        )
        await asyncio.sleep(2.0)
        receiving.cancel()
        await producer.stop()
    values = np.array(delays) if delays else np.array([math.nan])
    return Latency(
        sent,
        len(delays),
        float(np.percentile(values, 50)),
        float(np.percentile(values, 99)),
        float(values.max()),
    )


async def _steady(
    producer: AIOKafkaProducer, topic: str, rate: float, sensors: int, numbers: range
) -> int:
    """Send readings number ``numbers`` at ``rate`` per second, stamped with the clock."""
    started = time.perf_counter()
    for i, n in enumerate(numbers):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        reading = {"sensor_id": f"lat.{n % sensors}", "ts": time.time(), "value": math.sin(n)}
        await producer.send(topic, orjson.dumps(reading), reading["sensor_id"].encode())
    await producer.flush()
    return len(numbers)


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()

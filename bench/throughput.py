"""``forecast bench throughput`` and ``forecast bench latency``, in one process on an
embedded broker.

The broker, the worker and the gateway are started by the wiring of ``forecast up``
(:mod:`forecast.runtime`), on a fresh data directory (no registered model: the baseline
serves).

Throughput: the same records are read by a raw aiokafka consumer (``getmany`` + orjson),
by a plain Faust agent (iterates the stream, decodes each value), and by the engine's
worker (validation, per-sensor state, the baseline forecast, residuals and drift,
publication). Each is timed from its first records to its last, so consumer group joins
do not count; the worker's progress is read from its ``forecast_readings_total`` metric.

Latency: readings stamped with the wall clock when produced, at a steady rate over many
sensors, through the worker and a gateway to a websocket subscriber; the latency of a
prediction is its arrival time minus its reading's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
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

from forecast import metrics
from forecast.kafka import Transport
from forecast.runtime import authenticator, start_broker, start_gateway, start_worker
from forecast.settings import Settings, load_settings
from forecast.workers import WorkerPool
from gateway.http import ApiContext

START = 1_700_000_000.0


@dataclass
class Throughput:
    readings: int
    records: int
    produced_seconds: float
    raw_seconds: float
    faust_seconds: float
    engine_seconds: float
    processes: dict[int, float]  # worker processes -> seconds (``--workers``)

    def per_second(self, seconds: float) -> float:
        return self.readings / seconds if seconds > 0 else math.inf


def _settings(folder: str, **overrides: object) -> Settings:
    """The bench's settings: an embedded broker, a fresh data directory, no auth."""
    return load_settings(
        data_dir=Path(folder),
        kafka_bootstrap=None,
        broker_port=0,
        ws_port=0,
        retrain=False,
        auth=False,
        **overrides,
    )


def _quiet(line: str) -> None:
    """What ``forecast up`` announces (its URLs) is not the bench's output."""


async def throughput(
    readings: int, per_record: int, sensors: int, horizon: int, workers: int = 0
) -> Throughput:
    """With ``workers`` >= 1, also 1 and ``workers`` worker processes (as
    ``forecast up --workers N`` runs them), each over the same records afresh."""
    with tempfile.TemporaryDirectory() as folder:
        settings = _settings(folder, horizon=horizon, kafka_session_timeout=2)
        async with contextlib.AsyncExitStack() as stack:
            bootstrap = await start_broker(stack, settings, _quiet)
            topic = settings.topic("readings")
            started = time.perf_counter()
            records = await _produce(bootstrap, topic, readings, per_record, sensors)
            produced = time.perf_counter() - started
            raw = await _raw(bootstrap, topic, records)
            plain = await _plain_faust(bootstrap, topic, records, settings)
            engine = await _engine(bootstrap, settings, readings)
            processes = {}
            for count in sorted({1, workers}) if workers else ():
                group = f"bench-pool-{count}-{uuid.uuid4().hex[:6]}"  # a fresh group
                processes[count] = await _pool(bootstrap, folder, horizon, group, topic, count)
    return Throughput(readings, records, produced, raw, plain, engine, processes)


async def _pool(
    bootstrap: str, folder: str, horizon: int, app: str, topic: str, count: int
) -> float:
    """``count`` worker processes of one group over the whole topic; seconds from the
    group's first committed progress to the last record committed."""
    env = {
        "FORECAST_DATA_DIR": str(Path(folder) / app),
        "FORECAST_HORIZON": str(horizon),
        "FORECAST_KAFKA_SESSION_TIMEOUT": "2",
        "FORECAST_RETRAIN": "false",
        "FORECAST_AUTH": "false",
        "FORECAST_WORKER_APP": app,
    }
    settings = load_settings(data_dir=Path(folder) / app)
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # what the children read
    pool = WorkerPool(settings, bootstrap, count)
    try:
        await pool.start()
        return await _committed_until_end(bootstrap, app, topic)
    finally:
        await pool.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def _committed_until_end(bootstrap: str, group: str, topic: str) -> float:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = await consumer.end_offsets(partitions)
        total = sum(ends.values())
        first: tuple[float, int] | None = None
        async with asyncio.timeout(1800):
            while True:
                done = sum([(await consumer.committed(tp)) or 0 for tp in partitions])
                if first is None and done > 0:
                    first = (time.perf_counter(), done)
                if done >= total:
                    break
                await asyncio.sleep(0.05)
        if first is None or first[1] >= total:
            raise RuntimeError("the workers committed everything at once: use more --readings")
        return (time.perf_counter() - first[0]) * total / (total - first[1])
    finally:
        await consumer.stop()


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
        datadir=str(settings.data_dir / "faust-plain"),  # never the working directory
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
    app.conf.datadir.mkdir(parents=True, exist_ok=True)
    await app.start()
    try:
        await asyncio.wait_for(done.wait(), 600)
        return time.perf_counter() - marks["first"]
    finally:
        await app.stop()


async def _engine(bootstrap: str, settings: Settings, readings: int) -> float:
    """The worker of ``forecast up`` over the readings; the seconds ``readings`` take at
    the rate it kept from its first batch to its last (joining the group not counted)."""
    before = _accepted()
    async with contextlib.AsyncExitStack() as stack:
        started = time.perf_counter()
        await start_worker(stack, settings, bootstrap)
        first: tuple[float, float] | None = None  # when progress was first seen, and how much
        async with asyncio.timeout(1800):
            while (taken := _accepted() - before) < readings:
                if first is None and taken > 0:
                    first = (time.perf_counter(), taken)
                await asyncio.sleep(0.005)
        ended = time.perf_counter()
    if first is None:  # all in one go: the group's join counts too
        return ended - started
    return (ended - first[0]) * readings / (readings - first[1])


def _accepted() -> float:
    """Readings the worker in this process has taken in, as its metric counts them."""
    sample = metrics.REGISTRY.get_sample_value(
        "forecast_readings_total", {"result": "accepted", "reason": ""}
    )
    return sample or 0.0


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
        async with contextlib.AsyncExitStack() as stack:
            bootstrap = await start_broker(stack, settings, _quiet)
            await start_worker(stack, settings, bootstrap)
            context = ApiContext(auth=authenticator(settings))
            stream = await start_gateway(stack, settings, bootstrap, context)
            return await _measure(bootstrap, settings, stream.port, rate, sensors, seconds)


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

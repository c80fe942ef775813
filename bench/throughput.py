"""``forecast bench throughput`` and ``forecast bench latency``, in one process on an
embedded broker.

The broker, the worker and the gateway are started by the wiring of ``forecast up``
(:mod:`forecast.runtime`), on a fresh data directory whose registry has the trained LSTM
in production (:mod:`bench.serving`; ``--model baseline``: none), the baseline as its
fallback, residuals and drift on (the defaults).

Throughput: first every sensor's window is filled (``lookback`` readings per sensor, in
records of one sensor's history; not timed) and the worker is waited for; then, with the
worker's intake paused, the timed readings are produced, to the worker's topic and to a
copy topic. They are read by a raw
aiokafka consumer (``getmany`` + orjson) and by a plain Faust agent (iterates the stream,
decodes each value) from the copy, and by the engine's worker (validation, per-sensor
state, the LSTM, the baseline, residuals and drift, publication). Each is timed from its
first records to its last, so consumer group joins do not count; the worker's progress
is read from its ``forecast_readings_total`` metric, what served from
``forecast_predictions_total`` and ``forecast_fallbacks_total``. With ``--workers N``,
``WorkerPool`` runs 1 and then N worker processes over the whole topic afresh (each on a
data directory of its own), timed by their group's commits past the warm-up records;
what served is counted on the ``predictions`` topic.

Latency: windows are filled the same way first; then readings stamped with the wall
clock, at a steady rate over many sensors, go through the worker(s) and a gateway to a
websocket subscriber; the latency of a prediction is its arrival time minus its
reading's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import faust
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from websockets.asyncio.client import connect
from yarl import URL

from bench.broker import BrokerHop, Delays, steady
from bench.serving import (
    START,
    STEP,
    Commits,
    Produced,
    Served,
    ServedCount,
    bench_settings,
    create_topic,
    end_offsets,
    epoch,
    guarded,
    history,
    install,
    metric_counts,
    produce,
    quiet,
    rounds,
    served_on_topic,
    wait_committed,
    worker_env,
)
from forecast import metrics
from forecast.errors import ForecastError
from forecast.kafka import Transport
from forecast.runtime import (
    Failing,
    authenticator,
    settle_heap,
    start_broker,
    start_gateway,
    start_worker,
)
from forecast.settings import Settings
from forecast.workers import WorkerPool
from gateway.http import ApiContext

COPY = "bench.copy"  # the timed records again, for the raw consumer and the plain agent
COMMIT_TIMEOUT = 1800.0
STALL_CHECK = 5.0  # seconds between checks that a stalled run is over


@dataclass
class Run:
    """The engine over the timed readings: seconds at its rate, and what served them."""

    seconds: float
    served: ServedCount
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (in-process)


@dataclass
class Throughput:
    readings: int
    records: int
    warm: Produced  # the untimed history that filled every window
    warm_seconds: float  # until the in-process worker had taken it in
    raw_seconds: float
    faust_seconds: float
    engine: Run
    processes: dict[int, Run]  # worker processes -> their run (``--workers``)

    def per_second(self, seconds: float) -> float:
        return self.readings / seconds if seconds > 0 else math.inf

    def pool_per_second(self, seconds: float) -> float:
        """The rate of worker processes, which are timed over the warm-up too."""
        return (self.readings + self.warm.readings) / seconds if seconds > 0 else math.inf


async def throughput(
    readings: int, per_record: int, sensors: int, horizon: int, served: Served, workers: int = 0
) -> Throughput:
    """With ``workers`` >= 1, also 1 and ``workers`` worker processes (as
    ``forecast up --workers N`` runs them), each over the same records afresh."""
    with tempfile.TemporaryDirectory() as folder:
        settings = bench_settings(Path(folder) / "engine", horizon=horizon, kafka_session_timeout=2)
        install(settings, served)
        async with contextlib.AsyncExitStack() as stack:
            bootstrap = await start_broker(stack, settings, quiet)
            topic = settings.topic("readings")
            await create_topic(bootstrap, COPY, settings.kafka_partitions)
            window = served.window
            block = min(per_record, sensors)  # as `rounds` keys the timed records
            fill = history(range(sensors), range(window), window, block=block)
            warm = await produce(bootstrap, [topic], fill)
            timed = rounds(sensors, range(window, 1 << 40), per_record, readings)
            engine, warm_seconds, main = await _engine(bootstrap, settings, warm, timed, readings)
            raw = await _raw(bootstrap, COPY, main.records)
            plain = await _plain_faust(bootstrap, COPY, main.records, settings)
            processes = {}
            for count in sorted({1, workers}) if workers else ():
                where = Path(folder) / f"pool-{count}"
                processes[count] = await _pool(bootstrap, where, settings, served, count)
    return Throughput(readings, main.records, warm, warm_seconds, raw, plain, engine, processes)


async def _engine(
    bootstrap: str, settings: Settings, warm: Produced, timed, readings: int
) -> tuple[Run, float, Produced]:
    """The worker of ``forecast up``: takes in the warm-up (seconds it took), then the
    timed readings, produced while its intake was paused: as the raw consumer and the
    plain agent, it reads a topic already written, and the producer in this process does
    not compete with it. Timed from the resume until every timed reading is taken in and
    its messages are with the broker."""
    topic = settings.topic("readings")
    async with contextlib.AsyncExitStack() as stack:
        started = time.perf_counter()
        worker = await start_worker(stack, settings, bootstrap)
        settle_heap(stack)  # as `forecast up` does once its parts are up
        group = settings.topic(settings.worker_app)
        await guarded(wait_committed(bootstrap, group, topic, warm.records), worker)
        warm_seconds = time.perf_counter() - started
        before, served_before = _accepted(), ServedCount.now()
        await worker.intake.stop()
        main = await produce(bootstrap, [topic, COPY], timed)
        async with Commits(bootstrap, group, topic) as commits, asyncio.timeout(COMMIT_TIMEOUT):
            worker.processor.seconds.clear()
            began = time.perf_counter()
            await worker.intake.start()
            checked = (time.perf_counter(), -1.0)
            while (taken := _accepted() - before) < readings:
                if time.perf_counter() - checked[0] >= STALL_CHECK:
                    await _refuse_a_stall(commits, main, warm, taken, checked[1])
                    checked = (time.perf_counter(), taken)
                await asyncio.sleep(0.005)
            await worker.sends.drain()
            ended = time.perf_counter()
        stages = dict(worker.processor.seconds)
        await asyncio.sleep(0.2)  # the last batch's metrics
        served = ServedCount.now().since(served_before)
    return Run(ended - began, served, stages), warm_seconds, main


async def _refuse_a_stall(
    commits: Commits, timed: Produced, warm: Produced, taken: float, before: float
) -> None:
    """ForecastError if the worker committed every record but accepted fewer readings
    than the timed part holds (no progress since the last check): the rest was refused
    (e.g. taken as repeats after a rebalance), and waiting longer would not change it."""
    if taken != before:
        return
    if await commits.total() < warm.records + timed.records:
        return
    outcomes = metric_counts("forecast_readings", "result")
    raise ForecastError(
        f"the worker committed every record but accepted {taken:.0f} of the timed readings; "
        f"its outcomes since the start: {dict(outcomes)}"
    )


def _accepted() -> float:
    """Readings the worker in this process has taken in, as its metric counts them."""
    sample = metrics.REGISTRY.get_sample_value(
        "forecast_readings_total", {"result": "accepted", "reason": ""}
    )
    return sample or 0.0


async def _pool(bootstrap: str, where: Path, engine: Settings, served: Served, count: int) -> Run:
    """``count`` worker processes of one fresh group over the whole readings topic (the
    warm-up and the timed readings): seconds from their start to their last commit."""
    app = f"bench-pool-{count}-{uuid.uuid4().hex[:6]}"
    settings = bench_settings(
        where, horizon=engine.horizon, kafka_session_timeout=2, worker_app=app
    )
    install(settings, served)
    predictions = settings.topic("predictions")
    since = await end_offsets(bootstrap, predictions)
    with worker_env(settings):
        pool = WorkerPool(settings, bootstrap, count)
        try:
            await pool.start()
            timing = _committed_until_end(
                bootstrap, settings.topic(app), settings.topic("readings")
            )
            seconds = await guarded(timing, pool)
        finally:
            await pool.stop()
    counts = await served_on_topic(bootstrap, predictions, since, START + STEP * served.window)
    return Run(seconds, ServedCount(counts))


async def _committed_until_end(bootstrap: str, group: str, topic: str) -> float:
    """Seconds until the group has committed the whole topic. A worker acknowledges what
    its checkpoints cover, but over a backlog its commits came all at the end (a worker
    over 3,000 records committed none for 19 s, then all), so the time of a part of the
    topic cannot be read from them: the pools are timed over all of it."""
    started = time.perf_counter()
    async with Commits(bootstrap, group, topic) as commits:
        ends = await commits.consumer.end_offsets(commits.partitions)
        total = sum(ends.values())
        async with asyncio.timeout(COMMIT_TIMEOUT):
            while True:
                if await commits.total() >= total:
                    break
                await asyncio.sleep(0.05)
    return time.perf_counter() - started


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


# -- latency ----------------------------------------------------------------------------


@dataclass
class Latency:
    sent: int
    engine: Delays  # reading -> prediction at the websocket subscriber
    raw: Delays  # reading -> a raw aiokafka consumer of the same topic: one broker hop
    warm: Produced
    warm_seconds: float
    served: Counter  # predictions by model in the timed part, at the subscriber


async def latency(
    rate: float,
    sensors: int,
    seconds: float,
    served: Served,
    workers: int = 1,
    processes: bool = False,
) -> Latency:
    """Readings at ``rate`` per second over ``sensors``; latency at a subscriber. With
    ``workers`` > 1 or ``processes``, worker processes (``WorkerPool``) instead of one
    in this process (which runs the gateway and the subscriber)."""
    with tempfile.TemporaryDirectory() as folder:
        settings = bench_settings(folder, kafka_session_timeout=2)
        install(settings, served)
        async with contextlib.AsyncExitStack() as stack:
            bootstrap = await start_broker(stack, settings, quiet)
            started = time.perf_counter()
            part = await _workers(stack, settings, bootstrap, workers, processes)
            context = ApiContext(auth=authenticator(settings))
            stream = await start_gateway(stack, settings, bootstrap, context)
            settle_heap(stack)  # as `forecast up` does once its parts are up
            warm = await guarded(_fill(bootstrap, settings, sensors, served.window), part)
            warm_seconds = time.perf_counter() - started
            result = await _measure(bootstrap, settings, stream.port, rate, sensors, seconds)
            result.warm, result.warm_seconds = warm, warm_seconds
            return result


async def _workers(
    stack: contextlib.AsyncExitStack,
    settings: Settings,
    bootstrap: str,
    count: int,
    processes: bool = False,
) -> Failing:
    """One worker in this process, or ``count`` worker processes, as ``forecast up``."""
    if count <= 1 and not processes:
        return await start_worker(stack, settings, bootstrap)
    stack.enter_context(worker_env(settings))
    pool = WorkerPool(settings, bootstrap, count)
    stack.push_async_callback(pool.stop)
    await pool.start()
    return pool


async def _fill(bootstrap: str, settings: Settings, sensors: int, window: int) -> Produced:
    """Every sensor's window, in records of its history (an hour apart, ending more than
    a day ago); returns once the worker(s) committed them."""
    topic = settings.topic("readings")
    records = history(range(sensors), range(window), window, prefix="lat")
    warm = await produce(bootstrap, [topic], records)
    await wait_committed(bootstrap, settings.topic(settings.worker_app), topic, warm.records)
    return warm


async def _measure(
    bootstrap: str, settings: Settings, port: int, rate: float, sensors: int, seconds: float
) -> Latency:
    delays: list[float] = []
    models: Counter = Counter()
    async with connect(f"ws://127.0.0.1:{port}/v1/stream", max_queue=None) as ws:
        await ws.send(orjson.dumps({"op": "subscribe", "sensors": ["*"]}).decode())
        await ws.recv()  # subscribed
        warm_until = time.time() + 1e9

        async def receive() -> None:
            async for frame in ws:
                message = orjson.loads(frame)
                if message.get("type") == "prediction":
                    sent = epoch(message["ts"])
                    if sent >= warm_until:
                        delays.append(time.time() - sent)
                        models[message["model"]] += 1

        topic = settings.topic("readings")
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
        await producer.start()
        hop = await BrokerHop.start(bootstrap, topic)
        receiving = asyncio.create_task(receive())
        await asyncio.sleep(1.0)  # the feed passes what the warm-up published
        warm_until = time.time()
        sent = await steady(producer, topic, rate, sensors, range(int(rate * seconds)))
        await asyncio.sleep(2.0)
        receiving.cancel()
        raw = await hop.stop(since=warm_until)
        await producer.stop()
    return Latency(sent, Delays.of(delays), raw, Produced(), 0.0, models)

"""The batch intake (:mod:`streams.intake`) and the batched producer
(:func:`forecast.kafka.send_many`) against the real embedded broker: records handed over
in offset order and in batches no larger than the cap, only acknowledged offsets
committed, and batched messages on the partitions aiokafka's own partitioner picks."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer import AIOKafkaProducer as _Producer
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_kafka
from faust.types import TP, Message
from mode.utils.queues import FlowControlEvent
from yarl import URL

from forecast.kafka import DirectTransport, send_many
from streams.intake import BatchIntake, MessageBuffer

pytestmark = pytest.mark.integration

PARTITIONS = 4


# -- helpers ------------------------------------------------------------------------------


async def _new_topic(bootstrap: str, partitions: int = PARTITIONS) -> str:
    name = f"intake-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


def _app(bootstrap: str, datadir: Path) -> faust.App:
    loop = asyncio.get_running_loop()
    app = faust.App(
        f"intake-test-{uuid.uuid4().hex[:8]}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_partitions=PARTITIONS,
        broker_session_timeout=2,
        broker_heartbeat_interval=2 / 6,
        broker_commit_interval=0.2,
        producer_acks=-1,
        stream_wait_empty=False,
        loop=loop,
    )
    app.transport = DirectTransport([URL(f"kafka://{bootstrap}")], app, loop=loop)
    return app


@contextlib.asynccontextmanager
async def _running(app: faust.App, intake: BatchIntake | None = None) -> AsyncIterator[None]:
    app.conf.datadir.mkdir(parents=True, exist_ok=True)
    await app.start()
    if intake is not None:
        await intake.start()
    try:
        yield
    finally:
        if intake is not None:
            await intake.stop()
        await app.stop()


async def _produce(bootstrap: str, topic: str, start: int, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=-1)
    await producer.start()
    try:
        sent = [
            await producer.send(topic, f'{{"n": {n}}}'.encode(), key=f"sensor.{n % 7}".encode())
            for n in range(start, start + count)
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return {tp.partition: (await consumer.committed(tp)) or 0 for tp in tps}
    finally:
        await consumer.stop()


async def _until(condition: Callable[[], Awaitable[bool]], within: float) -> None:
    async with asyncio.timeout(within):
        while not await condition():  # noqa: ASYNC110 (the broker's state: polled)
            await asyncio.sleep(0.1)


class Recorder:
    """A handler that records its batches (and may be told to fail)."""

    def __init__(self, fail_on: int | None = None, ack_first: int | None = None) -> None:
        self.batches: list[list[Message]] = []
        self.fail_on = fail_on
        self.ack_first = ack_first  # acknowledge only so many of each batch
        self.changed = asyncio.Event()

    async def __call__(self, messages: list[Message]) -> list[Message] | None:
        if self.fail_on is not None and len(self.batches) == self.fail_on:
            raise RuntimeError("the handler failed")
        await asyncio.sleep(0.01)  # a batch takes a while: records pile up meanwhile
        self.batches.append(messages)
        self.changed.set()
        return None if self.ack_first is None else messages[: self.ack_first]

    @property
    def handed(self) -> list[Message]:
        return [m for batch in self.batches for m in batch]

    async def wait_for(self, count: int, within: float = 20) -> None:
        async with asyncio.timeout(within):
            while len(self.handed) < count:
                self.changed.clear()
                await self.changed.wait()


# -- the intake ---------------------------------------------------------------------------


async def test_records_come_in_offset_order_in_capped_batches_and_get_committed(
    broker: str, tmp_path: Path
) -> None:
    topic = await _new_topic(broker)
    await _produce(broker, topic, 0, 300)  # before consumption
    app = _app(broker, tmp_path)
    handler = Recorder()
    intake = BatchIntake(app, topic, handler, max_records=50)
    async with _running(app, intake):
        await handler.wait_for(100)
        await _produce(broker, topic, 300, 300)  # during consumption
        await handler.wait_for(600)
        offsets: dict[int, list[int]] = defaultdict(list)
        for message in handler.handed:
            assert message.topic == topic
            offsets[message.partition].append(message.offset)
        # each partition's records, all, once, in order (tansu's ListOffsets is no
        # reference: it answers the last batch's first offset + 1)
        assert all(seen == list(range(len(seen))) for seen in offsets.values())
        ends = {p: len(offsets.get(p, ())) for p in range(PARTITIONS)}

        async def committed_all() -> bool:
            return await _committed(broker, app.conf.id, topic, PARTITIONS) == ends

        await _until(committed_all, within=15)

    assert all(1 <= len(batch) <= 50 for batch in handler.batches)
    assert len(handler.batches) < 600  # records that arrived together came together
    assert sorted(int(m.value[6:-1]) for m in handler.handed) == list(range(600))
    assert intake.failure is None and intake.pending == 0


async def test_only_acknowledged_records_are_committed_and_a_raise_acknowledges_none(
    broker: str, tmp_path: Path
) -> None:
    topic = await _new_topic(broker, partitions=1)
    await _produce(broker, topic, 0, 40)
    app = _app(broker, tmp_path)
    handler = Recorder(fail_on=1, ack_first=5)  # the first batch passes, the second raises
    failures: list[BaseException] = []
    intake = BatchIntake(app, topic, handler, max_records=10, on_error=failures.append)
    async with _running(app, intake):
        await _until(lambda: _true(bool(failures)), within=20)
        assert not intake.running
        await app.consumer.commit()
        committed = await _committed(broker, app.conf.id, topic, 1)
    assert isinstance(intake.failure, RuntimeError) and failures == [intake.failure]
    (first,) = handler.batches
    assert committed == {0: min(5, len(first))}  # what the first batch acknowledged only


async def _true(value: bool) -> bool:
    return value


async def test_an_idle_intake_hands_a_record_over_at_once(broker: str, tmp_path: Path) -> None:
    topic = await _new_topic(broker)
    app = _app(broker, tmp_path)
    arrived: list[float] = []

    async def handler(messages: list[Message]) -> None:
        arrived.extend(time.monotonic() for _ in messages)

    intake = BatchIntake(app, topic, handler)
    async with _running(app, intake):
        await _produce(broker, topic, 0, 1)  # the group has joined once this is handed over
        await _until(lambda: _true(len(arrived) == 1), within=20)
        await asyncio.sleep(0.5)  # idle
        sent = time.monotonic()
        await _produce(broker, topic, 1, 1)
        await _until(lambda: _true(len(arrived) == 2), within=5)
    assert arrived[1] - sent < 1.0


async def test_the_buffer_holds_back_delivery_above_its_high_water_mark() -> None:
    acked: set[str] = set()
    app = SimpleNamespace(
        consumer_generation_id=3,
        topics=SimpleNamespace(acks_enabled_for=lambda topic: topic in acked),
        consumer=SimpleNamespace(track_message=lambda message: None),
    )
    buffer = MessageBuffer(app, high_water=3)  # type: ignore[arg-type]

    def message(offset: int, generation: int = 3, partition: int = 0) -> Message:
        return Message(
            "t", partition, offset, 0.0, 0, None, b"k", b"v", None, generation_id=generation
        )

    for offset in range(3):
        buffer.put_nowait_enhanced(message(offset), on_pressure_high=print, on_pressure_drop=print)
    assert buffer.full()
    blocked = asyncio.ensure_future(buffer.put(message(3)))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    assert [m.offset for m in await buffer.take(2)] == [0, 1]
    await asyncio.wait_for(blocked, 1)
    buffer.put_nowait_enhanced(
        message(4, generation=2), on_pressure_high=print, on_pressure_drop=print
    )
    buffer.put_nowait_enhanced(
        message(5, partition=1), on_pressure_high=print, on_pressure_drop=print
    )
    assert buffer.forget({TP("t", 1)}) == 1
    assert [m.offset for m in await buffer.take(10)] == [2, 3]  # offset 4 was stale
    waiting = asyncio.ensure_future(buffer.take(10))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    buffer.put_nowait_enhanced(message(6), on_pressure_high=print, on_pressure_drop=print)
    assert [m.offset for m in await asyncio.wait_for(waiting, 1)] == [6]


async def test_a_batch_holds_no_more_record_bytes_than_its_cap_but_at_least_one_record() -> None:
    app = SimpleNamespace(
        consumer_generation_id=0,
        topics=SimpleNamespace(acks_enabled_for=lambda topic: False),
        consumer=SimpleNamespace(track_message=lambda message: None),
    )
    buffer = MessageBuffer(app, high_water=100)  # type: ignore[arg-type]
    for offset, size in enumerate([400, 300, 400, 2000, 10]):
        buffer.put_nowait_enhanced(
            Message("t", 0, offset, 0.0, 0, None, b"k", b"v" * size, None, generation_id=0),
            on_pressure_high=print,
            on_pressure_drop=print,
        )
    assert [m.offset for m in await buffer.take(10, max_bytes=1000)] == [0, 1]
    assert [m.offset for m in await buffer.take(10, max_bytes=1000)] == [2]
    assert [m.offset for m in await buffer.take(10, max_bytes=1000)] == [3]  # alone, over
    assert [m.offset for m in await buffer.take(10, max_bytes=1000)] == [4]


async def test_a_resume_keeps_what_was_fetched_in_this_generation_a_rebalance_drops_all() -> None:
    """Flow control clears its queues on a rebalance and again when it resumes, after
    the recovery's seek: a record fetched between the two must not be lost."""
    flow = FlowControlEvent(initially_suspended=False)
    app = SimpleNamespace(
        consumer_generation_id=2,
        flow_control=flow,
        topics=SimpleNamespace(acks_enabled_for=lambda topic: False),
        consumer=SimpleNamespace(track_message=lambda message: None),
    )
    buffer = MessageBuffer(app, high_water=100)  # type: ignore[arg-type]
    flow.manage_queue(buffer)  # type: ignore[arg-type]

    def put(offset: int) -> None:
        generation = app.consumer_generation_id
        buffer.put_nowait_enhanced(
            Message("t", 0, offset, 0.0, 0, None, b"k", b"v", None, generation_id=generation),
            on_pressure_high=print,
            on_pressure_drop=print,
        )

    put(0)
    app.consumer_generation_id = 3  # a rebalance ended: offset 0 is stale
    put(8)  # fetched after the recovery's seek
    flow.resume()
    assert [m.offset for m in buffer.messages] == [8]
    flow.suspend()  # the next rebalance
    flow.clear()
    assert len(buffer) == 0 and not buffer.arrived.is_set()


# -- send_many ----------------------------------------------------------------------------


async def test_send_many_puts_keyed_messages_where_aiokafka_would(
    broker: str, tmp_path: Path
) -> None:
    topic = await _new_topic(broker)
    app = _app(broker, tmp_path)
    await app.producer.start()
    try:
        payload = b"x" * 1000  # 120 of them fill several batches per partition
        keyed = [
            (topic, f"k{n}".encode(), payload + str(n).encode(), None, None) for n in range(120)
        ]
        extra = [
            (topic, b"k7", b"with headers", [("h", b"1")], None),
            (topic, b"k7", b"mapped headers", {"h": b"2"}, None),
            (topic, None, b"keyless", None, None),
            (topic, b"k1", b"pinned", None, 3),
        ]
        await send_many(app.producer, keyed + extra)
        again = [(topic, key, b"again " + key, None, None) for _, key, *_ in keyed[:20]]
        await send_many(app.producer, again)  # the keys' partitions, now remembered
        single = await (await app.producer.send(topic, b"k5", b"one by one", None, None, None))
        with pytest.raises(MessageSizeTooLargeError):
            await send_many(app.producer, [(topic, b"k", b"x" * (2 << 20), None, None)])
    finally:
        await app.producer.stop()

    consumer = AIOKafkaConsumer(bootstrap_servers=broker, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.subscribe([topic])
        read: list = []
        async with asyncio.timeout(20):
            while len(read) < len(keyed) + len(extra) + len(again) + 1:
                batches = await consumer.getmany(timeout_ms=500)
                read += [record for records in batches.values() for record in records]
    finally:
        await consumer.stop()

    partitions = list(range(PARTITIONS))
    by_value = {record.value: record for record in read}
    for _, key, value, _, _ in keyed + again:
        assert by_value[value].partition == DefaultPartitioner()(key, partitions, partitions)
        assert by_value[value].key == key
    assert by_value[b"one by one"].partition == single.partition
    assert by_value[b"one by one"].partition == by_value[payload + b"5"].partition  # k5
    assert by_value[b"with headers"].headers == (("h", b"1"),)
    assert by_value[b"mapped headers"].headers == (("h", b"2"),)
    assert by_value[b"pinned"].partition == 3
    assert b"keyless" in by_value
    k7 = [r.value for r in sorted(read, key=lambda r: r.offset) if r.key == b"k7"]
    assert k7 == [payload + b"7", b"with headers", b"mapped headers", b"again k7"]  # in order


# -- the internals these rely on ------------------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "name", "parameters"),
    [
        (faust_consumer.Consumer, "_drain_messages", ["fetcher"]),
        (faust_consumer.Consumer, "getmany", ["timeout"]),
        (faust_kafka.Producer, "_ensure_producer", []),
        (_Producer, "_serialize", ["key", "value", "headers"]),
        (_Producer, "create_batch", []),
        (_Producer, "send_batch", ["batch", "topic", "partition"]),
    ],
)
def test_the_internals_keep_their_signatures(owner: type, name: str, parameters: list) -> None:
    method = getattr(owner, name, None)
    assert method is not None, f"{owner.__qualname__}.{name} is gone"
    assert list(inspect.signature(method).parameters)[1:] == parameters


def test_the_internals_keep_their_shapes() -> None:
    drain = inspect.getsource(faust_consumer.Consumer._drain_messages)
    for used in ("self.callback", "self._read_offset", "self._commit_every", "self._n_acked"):
        assert used in drain, f"Faust's _drain_messages no longer uses {used}"
    partition = inspect.getsource(_Producer._partition)
    for used in ("self._metadata.partitions_for_topic", "self._partitioner("):
        assert used in partition, f"aiokafka's _partition no longer uses {used}"

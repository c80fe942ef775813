"""What ``forecast/kafka.py`` relies on in Faust and aiokafka is still there. After an
upgrade, a failure here names the internal that changed; ``pyproject.toml`` bounds both
packages to the versions these tests passed on."""

from __future__ import annotations

import asyncio
import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path

import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from faust.tables.recovery import Recovery
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_kafka
from faust.types import TP
from packaging.requirements import Requirement
from yarl import URL

from forecast.kafka import FETCH_WAIT_MS, Transport, committed_offset

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"


@pytest.mark.parametrize("name", ["faust-streaming", "aiokafka"])
def test_the_installed_version_is_within_the_checked_bounds(name: str) -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    (requirement,) = [r for r in map(Requirement, project["dependencies"]) if r.name == name]
    assert any(spec.operator == "<" for spec in requirement.specifier), (
        f"{name} needs an upper bound: forecast/kafka.py uses its internals"
    )
    assert requirement.specifier.contains(version(name)), (
        f"{name} {version(name)} is outside {requirement.specifier}: check forecast/kafka.py"
    )


@pytest.mark.parametrize(
    ("owner", "name", "parameters", "is_coroutine"),
    [
        (faust_kafka.AIOKafkaConsumerThread, "_create_worker_consumer", ["transport"], False),
        (faust_kafka.Consumer, "_new_consumer_thread", [], False),
        (faust_consumer.Consumer, "_add_gap", ["tp", "offset_from", "offset_to"], True),
        (AIOKafkaClient, "force_metadata_update", [], False),
    ],
)
def test_the_overridden_and_called_internals_keep_their_signatures(
    owner: type, name: str, parameters: list[str], is_coroutine: bool
) -> None:
    method = getattr(owner, name, None)
    assert method is not None, f"{owner.__qualname__}.{name} is gone"
    assert list(inspect.signature(method).parameters)[1:] == parameters, (
        f"{owner.__qualname__}.{name}{inspect.signature(method)} changed"
    )
    assert inspect.iscoroutinefunction(method) is is_coroutine


def test_the_libraries_still_use_the_internals_the_adapter_sets() -> None:
    # Faust records skipped offsets through _add_gap while it drains messages,
    assert "self._add_gap(" in inspect.getsource(faust_consumer.Consumer)
    # and keeps committed offsets per partition in _committed_offset;
    assert "self._committed_offset = " in inspect.getsource(faust_consumer.Consumer.__init__)
    # aiokafka reads the fetch wait when the consumer starts, not when it is built.
    assert "self._fetch_max_wait_ms" in inspect.getsource(AIOKafkaConsumer.start)
    # Faust's table recovery reads each changelog up to the offsets API's end (which the
    # worker's checkpoint marker makes right on tansu).
    assert "consumer.highwaters(" in inspect.getsource(Recovery._build_highwaters)


async def test_the_adapter_works_on_the_installed_classes(tmp_path: Path) -> None:
    url = "kafka://127.0.0.1:9"  # never connected to
    app = faust.App(
        "adapter-check",
        broker=url,
        store="memory://",
        web_enabled=False,
        datadir=tmp_path,
        loop=asyncio.get_running_loop(),
    )
    app.transport = Transport([URL(url)], app, loop=app.loop)
    consumer = app.consumer
    tp = TP("readings", 0)
    assert committed_offset(consumer, tp) is None
    thread = consumer._thread  # made by the adapter's _new_consumer_thread, not started
    try:
        client = thread._create_worker_consumer(app.transport)
        assert isinstance(client, AIOKafkaConsumer)
        assert client._fetch_max_wait_ms == FETCH_WAIT_MS
        assert isinstance(client._client, AIOKafkaClient)
        await client.stop()
    finally:
        thread.thread_loop.close()  # the loop it made for itself
    await consumer._add_gap(tp, 3, 4)  # the override: a hole is not acknowledged
    assert not consumer._gap[tp]
    await consumer.pass_hole(tp, 5, 7)  # Faust's own: commits may pass 5..7
    assert [(i.begin, i.end) for i in consumer._gap[tp]] == [(5, 8)]


@pytest.mark.integration
async def test_a_batch_of_its_own_makes_the_offsets_api_end_right(broker: str) -> None:
    """tansu answers an offset request with the base offset of the partition's last
    record batch + 1; Faust's table recovery reads a changelog up to that end, so the
    worker ends each checkpoint with a record batch of its own (Worker._write_checkpoint)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("adapter.ends", 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks=-1)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker)
    await producer.start()
    await consumer.start()
    tp = TopicPartition("adapter.ends", 0)
    try:
        sent = [await producer.send("adapter.ends", b"%d" % i, partition=0) for i in range(3)]
        assert [(await s).offset for s in sent] == [0, 1, 2]  # one batch of three
        assert (await consumer.end_offsets([tp]))[tp] < 3  # the broker's answer falls short
        await (await producer.send("adapter.ends", b"", partition=0))  # a batch of its own
        assert (await consumer.end_offsets([tp]))[tp] == 4
    finally:
        await producer.stop()
        await consumer.stop()

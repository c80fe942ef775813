"""Bad input lands in `readings.dlq` with its reason, raw bytes and source; good input
around it is still processed."""

from __future__ import annotations

import asyncio
import json
import math

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import System

pytestmark = pytest.mark.integration

HAND_PICKED = [
    (b"not json at all", "not_json"),
    (b'{"sensor_id": "dlq.a", "ts": 1467331200}', "missing_field"),
    (b'{"sensor_id": "dlq.a", "ts": 1467331200, "value": NaN}', "non_finite"),
    (b'{"sensor_id": "dlq.a", "ts": 1467331200, "value": Infinity}', "non_finite"),
    (b'{"sensor_id": "dlq.a", "ts": "the day after", "value": 1}', "bad_time"),
    (b'{"sensor_id": "dlq.a", "ts": 99999999999, "value": 1}', "absurd_time"),
    (b'{"sensor_id": "dlq.a", "ts": 1467331200, "value": "7"}', "wrong_type"),
    (b'{"sensor_id": ["dlq.a"], "ts": 1467331200, "value": 7}', "wrong_type"),
    (
        b'{"sensor_id": "dlq.a", "ts": 1467331200, "value": 7, "pad": "' + b"x" * 1_000_100 + b'"}',
        "oversize",
    ),
]


async def produce(bootstrap: str, records: list[tuple[bytes, bytes]]) -> list[tuple[int, int]]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=4_000_000)
    await producer.start()
    try:
        sent = [await producer.send("readings", value, key=key) for key, value in records]
        return [((m := await fut).partition, m.offset) for fut in sent]
    finally:
        await producer.stop()


async def dead_letters(bootstrap: str, want: set[tuple[int, int]], within: float = 60) -> dict:
    """DLQ records whose source (partition, offset) is in ``want``, by that source."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, max_partition_fetch_bytes=4_000_000
    )
    await consumer.start()
    found: dict[tuple[int, int], list] = {}
    try:
        partitions = [
            TopicPartition("readings.dlq", p) for p in consumer.partitions_for_topic("readings.dlq")
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        async with asyncio.timeout(within):
            while not want <= found.keys():
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        headers = {k: v.decode() for k, v in record.headers}
                        source = (int(headers["dlq.partition"]), int(headers["dlq.offset"]))
                        if source in want:
                            found.setdefault(source, []).append((record, headers))
    finally:
        await consumer.stop()
    return found


def good(sensor: str, hour: int) -> bytes:
    return orjson.dumps({"sensor_id": sensor, "ts": 1467331200 + 3600 * hour, "value": hour})


async def test_hand_picked_bad_records_and_the_good_ones_around_them(system: System) -> None:
    records, expected = [], {}
    for hour, (raw, reason) in enumerate(HAND_PICKED):
        records.append((b"dlq.good", good("dlq.good", hour)))
        records.append((b"dlq.a", raw))
        expected[len(records) - 1] = reason
    records.append((b"dlq.good", good("dlq.good", len(HAND_PICKED))))
    batch = [
        orjson.loads(good("dlq.batch", 0)),
        {"sensor_id": "dlq.batch"},
        orjson.loads(good("dlq.batch", 1)),
    ]
    records.append((b"dlq.batch", orjson.dumps(batch)))

    sources = await produce(system.kafka, records)
    want = {sources[i] for i in expected} | {sources[-1]}
    found = await dead_letters(system.kafka, want)

    for index, reason in expected.items():
        ((record, headers),) = found[sources[index]]
        assert headers["dlq.reason"] == reason, (records[index][1][:80], headers)
        assert headers["dlq.topic"] == "readings"
        assert headers["dlq.detail"]
        raw = records[index][1]
        if reason == "oversize":  # the first 64 KiB and the full size
            assert headers["dlq.original_size"] == str(len(raw))
            raw = raw[: 64 * 1024]
        assert record.value == raw
        assert record.key == b"dlq.a"
    ((record, headers),) = found[sources[-1]]  # only the bad element of the batch
    assert headers["dlq.reason"] == "missing_field"
    assert headers["dlq.index"] == "1"
    assert orjson.loads(record.value) == {"sensor_id": "dlq.batch"}

    counts = await asyncio.to_thread(
        system.cli,
        "query",
        "SELECT sensor_id, count() AS n FROM forecast.readings "
        "WHERE sensor_id IN ('dlq.good', 'dlq.batch') GROUP BY sensor_id ORDER BY sensor_id",
        "--format",
        "json",
    )
    assert json.loads(counts.stdout) == [
        {"sensor_id": "dlq.batch", "n": 2},
        {"sensor_id": "dlq.good", "n": len(HAND_PICKED) + 1},
    ]


def bad_readings() -> st.SearchStrategy[tuple[bytes, str]]:
    base = {"sensor_id": "dlq.h", "ts": 1467331200, "value": 1.5}
    missing = st.sets(st.sampled_from(list(base)), min_size=1).map(
        lambda drop: ({k: v for k, v in base.items() if k not in drop}, "missing_field")
    )
    non_finite = st.sampled_from([math.nan, math.inf, -math.inf]).map(
        lambda v: ({**base, "value": v}, "non_finite")
    )
    wrong_value = (st.text(max_size=5) | st.booleans() | st.none() | st.lists(st.integers())).map(
        lambda v: ({**base, "value": v}, "wrong_type")
    )
    bad_time = st.text(alphabet="abcxyz:-", min_size=1, max_size=12).map(
        lambda t: ({**base, "ts": t}, "bad_time")
    )
    bad_id = st.text(alphabet=" /#?!", min_size=1, max_size=5).map(
        lambda s: ({**base, "sensor_id": s}, "bad_sensor_id")
    )
    return st.one_of(missing, non_finite, wrong_value, bad_time, bad_id).map(
        lambda pair: (json.dumps(pair[0]).encode(), pair[1])
    )


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(bad_readings(), min_size=1, max_size=6))
def test_generated_bad_records_land_in_the_dlq(
    system: System, bad: list[tuple[bytes, str]]
) -> None:
    async def roundtrip() -> None:
        sources = await produce(system.kafka, [(b"dlq.h", raw) for raw, _ in bad])
        found = await dead_letters(system.kafka, set(sources))
        for source, (raw, reason) in zip(sources, bad, strict=True):
            ((record, headers),) = found[source]
            assert (headers["dlq.reason"], record.value) == (reason, raw)

    asyncio.run(roundtrip())

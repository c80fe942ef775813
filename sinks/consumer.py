"""The ClickHouse sink: a consumer group of its own on the ``store.<table>`` topics.

Workers publish each batch's rows there as Arrow tables (:mod:`sinks.batches`), one topic
per table (``store.readings``, ``store.predictions``, ``store.drift_events``), and never
wait for the store. The sink takes what has arrived (up to ``sink_batch_records``
records), concatenates each table's records, and inserts each table in one columnar
block. Then, and only then, it commits the offsets.

Every row carries the partition of the record it came in, the offset after it and the
record's time (``src_partition``, ``src_offset``: Kafka's committed-offset convention, so 0
means "not from the sink"; ``src_timestamp``, ms). When partitions are assigned the sink
reads, per table and partition, the highest stored offset and the latest stored record
time, and skips a record at or below that offset unless it is newer than that time: a
batch re-delivered after a crash (stored, not yet committed) leaves no second copy, in the
``_log`` tables as in the views, while the records of a topic recreated since (a broker
that lost its data: its offsets start again at 0) are newer, and stored.

While ClickHouse fails, the sink pauses its partitions (nothing more is fetched or
buffered), keeps polling so that it stays in its group, and retries the insert with
backoff (0.1 s doubling to 5 s); readiness (``healthy``) is false meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from forecast import metrics
from forecast.errors import StoreError
from forecast.settings import Settings
from sinks.batches import TABLES, decode
from sinks.clickhouse import Store
from sinks.schema import LOG_TABLES

log = logging.getLogger(__name__)

FETCH_WAIT_MS = 10
LOW_CARDINALITY = frozenset({"sensor_id", "model", "stage", "detector", "signal"})
MAX_BACKOFF = 5.0


class Sink:
    """Consumes ``store.*`` records into ClickHouse; ``start``, ``run`` in a task, ``stop``."""

    def __init__(self, settings: Settings, bootstrap: str, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.topics = {settings.topic(f"store.{name}"): name for name in TABLES}
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=settings.topic("forecast-sink"),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FETCH_WAIT_MS,
            max_partition_fetch_bytes=8 << 20,
            session_timeout_ms=int(settings.kafka_session_timeout * 1000),
            heartbeat_interval_ms=int(settings.kafka_session_timeout * 1000 / 6),
        )
        self.watermarks: dict[str, dict[int, tuple[int, int]]] = {name: {} for name in TABLES}
        self.healthy = True
        self.stored_at = time.monotonic()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.consumer.subscribe(list(self.topics), listener=_Watermarks(self))
        await self.consumer.start()
        self._task = asyncio.create_task(self.run(), name="sink")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()

    async def run(self) -> None:
        while True:
            try:
                batch = await self.consumer.getmany(
                    timeout_ms=200, max_records=self.settings.sink_batch_records
                )
            except KafkaError as exc:
                log.warning("sink: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if batch:
                await self.write(batch)

    async def write(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """Store what ``batch`` holds beyond the watermarks, then commit its offsets."""
        tables = self.collect(batch)
        started = time.perf_counter()
        delay = 0.1
        while True:
            try:
                await asyncio.to_thread(self._insert, tables)
                break
            except StoreError as exc:
                self.healthy = False
                metrics.SINK_ERRORS.inc()
                log.warning("sink: store write failed, retrying in %.1fs: %s", delay, exc)
                self.consumer.pause(*self.consumer.assignment())
                with contextlib.suppress(KafkaError):  # keeps the group alive; fetches nothing
                    await self.consumer.getmany(timeout_ms=int(delay * 1000))
                delay = min(delay * 2, MAX_BACKOFF)
        self.consumer.resume(*self.consumer.assignment())
        self.healthy = True
        self.stored_at = time.monotonic()
        metrics.SINK_FLUSH_SECONDS.observe(time.perf_counter() - started)
        for name, table in tables.items():
            metrics.SINK_ROWS.labels(name).inc(table.num_rows)
            for partition, mark in _last_records(table).items():
                self.watermarks[name][partition] = mark  # rows are stored in offset order
        offsets = {
            tp: OffsetAndMetadata(records[-1].offset + 1, "") for tp, records in batch.items()
        }
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:  # stored already: a re-delivery is skipped by watermark
            log.warning("sink: commit failed (re-delivery will be skipped): %s", exc)

    def collect(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> dict[str, pa.Table]:
        """Each table's new rows from ``batch``, with their source columns."""
        parts: dict[str, list[pa.Table]] = defaultdict(list)
        for tp, records in batch.items():
            for record in records:
                name = self.topics[tp.topic]
                after = record.offset + 1
                offset, at = self.watermarks[name].get(tp.partition, (0, 0))
                if after <= offset and record.timestamp <= at:
                    continue  # stored before a crash, or before this consumer took over
                try:
                    table = decode(name, record.value or b"")
                except ValueError as exc:
                    metrics.SINK_REJECTED.inc()
                    log.error(
                        "sink: skipped record %s[%d]@%d: %s",
                        tp.topic,
                        tp.partition,
                        record.offset,
                        exc,
                    )
                    continue
                rows = table.num_rows
                parts[name].append(
                    table.append_column(
                        "src_partition", pa.array(np.full(rows, tp.partition, np.uint32))
                    )
                    .append_column("src_offset", pa.array(np.full(rows, after, np.uint64)))
                    .append_column(
                        "src_timestamp", pa.array(np.full(rows, record.timestamp, np.uint64))
                    )
                )
        return {name: _low_cardinality(pa.concat_tables(tables)) for name, tables in parts.items()}

    def _insert(self, tables: dict[str, pa.Table]) -> None:
        """Each table in one block. The token names the block's records by partition,
        first offset and that record's time (offsets alone repeat on a recreated topic, and
        ClickHouse would drop the new block as a repeat of an old one)."""
        for name, table in tables.items():
            first = _first_records(table)
            token = ",".join(f"{p}:{o}@{t}" for p, (o, t) in sorted(first.items()))
            self.store.insert_arrow(LOG_TABLES[name], table, f"sink:{token}:{table.num_rows}")

    def load_watermarks(self, committed: set[tuple[str, int]]) -> None:
        """The stored watermarks of the partitions this group has committed offsets for
        (``committed``, by table and partition): without one, the log is new to the group
        (a broker that lost its data), and what is stored belongs to another log."""
        for name in TABLES:
            marks = self.store.watermarks(LOG_TABLES[name])
            self.watermarks[name] = {
                partition: mark
                for partition, mark in marks.items()
                if (name, partition) in committed
            }


class _Watermarks(ConsumerRebalanceListener):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        committed = set()
        for tp in assigned:
            if await self.sink.consumer.committed(tp) is not None:
                committed.add((self.sink.topics[tp.topic], tp.partition))
        await asyncio.to_thread(self.sink.load_watermarks, committed)


def _low_cardinality(table: pa.Table) -> pa.Table:
    """Names as dictionaries: ClickHouse takes them into LowCardinality columns at a
    fraction of the cost of plain strings (twice the insert rate for predictions)."""
    for index, field in enumerate(table.schema):
        if field.name in LOW_CARDINALITY:
            table = table.set_column(index, field.name, table.column(index).dictionary_encode())
    return table


def _last_records(table: pa.Table) -> dict[int, tuple[int, int]]:
    offsets, at = _by_partition(table, "src_offset"), _by_partition(table, "src_timestamp")
    return {partition: (offsets[partition], at[partition]) for partition in offsets}


def _first_records(table: pa.Table) -> dict[int, tuple[int, int]]:
    offsets = _by_partition(table, "src_offset", np.minimum)
    at = _by_partition(table, "src_timestamp", np.minimum)
    return {partition: (offsets[partition], at[partition]) for partition in offsets}


def _by_partition(table: pa.Table, column: str, reduce: np.ufunc = np.maximum) -> dict[int, int]:
    partitions = table.column("src_partition").to_numpy()
    offsets = table.column(column).to_numpy()
    out: dict[int, int] = {}
    for partition in np.unique(partitions):
        out[int(partition)] = int(reduce.reduce(offsets[partitions == partition]))
    return out

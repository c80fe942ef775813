"""The one adapter to Faust's and aiokafka's internals: every use of a private attribute
of either library is in this module, and ``tests/test_adapter.py`` fails loudly when an
upgrade changes one of them (``pyproject.toml`` bounds both packages to the versions
checked).

What it relies on:

* Faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500``: a broker may hold a
  fetch that long when no data is waiting, and tansu does, which put ~0.4 s between a
  reading and its prediction at low traffic. :class:`Transport` sets the wait to
  ``FETCH_WAIT_MS`` through Faust's own extension points (``Transport.Consumer`` and its
  consumer thread's ``_create_worker_consumer``) on the consumer's
  ``_fetch_max_wait_ms``, which aiokafka reads when the consumer starts; under load
  fetches return at once either way.
* Faust's consumer counts offsets it skipped (``Consumer._add_gap``) as acknowledged;
  this one leaves such holes to the worker instead (see :mod:`streams.ordering`), which
  passes only real holes with :meth:`pass_hole`.
* Faust keeps the committed offset of each partition in ``Consumer._committed_offset``
  (:func:`committed_offset`).
* aiokafka's consumer has no public call that refreshes its cluster metadata
  (:func:`refresh_metadata`).
* tansu answers offset requests with the base offset of the partition's last record
  batch + 1, not its end (``tests/test_adapter.py`` checks it): the liveness probe uses
  the end a fetch reports, and the worker ends each checkpoint with a record batch of
  its own, so that Faust's table recovery, which trusts the offsets API, reads every
  snapshot (:meth:`streams.worker.Worker._write_checkpoint`).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_kafka

FETCH_WAIT_MS = 10
RECORD_OVERHEAD_BOUND = 1024  # bytes: above aiokafka's estimate of a record batch's header
KEY_CACHE_SIZE = 1 << 17  # keys whose partition is remembered, per topic
_KEY_PARTITIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per producer
log = logging.getLogger(__name__)


class _ConsumerThread(faust_kafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_WAIT_MS  # read when the consumer starts
        return consumer


class _Consumer(faust_kafka.Consumer):
    def _new_consumer_thread(self) -> faust_kafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        """Faust counts offsets it skipped as acknowledged; the worker reads them again
        instead (:mod:`streams.ordering`) and passes only real holes, with ``pass_hole``."""

    async def pass_hole(self, tp: Any, first: int, last: int) -> None:
        """Let commits pass offsets ``first`` to ``last``: there are no records there."""
        await super()._add_gap(tp, first, last)


class Transport(faust_kafka.Transport):
    """Faust's Kafka transport with a short fetch wait and holes left to the worker."""

    Consumer = _Consumer


def committed_offset(consumer: faust_kafka.Consumer, tp: Any) -> int | None:
    """Faust's committed offset of a partition (the next to read), if it knows one."""
    return consumer._committed_offset.get(tp)


async def refresh_metadata(consumer: AIOKafkaConsumer) -> None:
    """Ask the broker for the cluster's metadata now (topics created since the start)."""
    await consumer._client.force_metadata_update()


OutgoingMessage = tuple[
    str,  # topic
    bytes | None,  # key
    bytes | None,  # value
    Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None,  # headers
    int | None,  # partition: None for the partition of the key
]


async def send_many(producer: faust_kafka.Producer, messages: Iterable[OutgoingMessage]) -> None:
    """Send ``messages`` in record batches; returns once the broker acknowledged all.

    A message without a partition goes where ``producer.send(topic, key, value, None,
    None, headers)`` sends it: aiokafka's own partitioner picks it (murmur2 of the key;
    keyless, a random available partition). Each (topic, partition) gets its messages in
    order, in as many batches of the producer's ``max_batch_size`` as they fill.

    Raises what aiokafka raises, unwrapped (after every batch has settled): a
    :class:`~aiokafka.errors.KafkaError` (``MessageSizeTooLargeError`` for a record over
    ``max_request_size``, ``KafkaTimeoutError`` when no batch slot frees up or a batch
    expires, a broker's error such as ``NotLeaderForPartitionError``),
    ``faust.exceptions.NotReady`` before the producer started, and ``AssertionError``
    for a partition the topic does not have (as aiokafka's ``send`` does).
    """
    client: AIOKafkaProducer = producer._ensure_producer()  # NotReady before it starts
    routed = await _route(client, messages)
    futures: list[asyncio.Future] = []
    submitted = await asyncio.gather(
        *(_submit(client, tp, records, futures) for tp, records in routed.items()),
        return_exceptions=True,
    )
    delivered = await asyncio.gather(*futures, return_exceptions=True)
    for outcome in (*submitted, *delivered):
        if isinstance(outcome, BaseException):
            raise outcome


_Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


async def _route(
    client: AIOKafkaProducer, messages: Iterable[OutgoingMessage]
) -> dict[TopicPartition, list[_Record]]:
    """The messages by destination, in order; partitions chosen as ``client.send`` does."""
    routed: dict[tuple[str, int], list[_Record]] = defaultdict(list)
    partitions: dict[str, tuple[list[int], list[int]]] = {}
    by_key: dict[str, dict[bytes, int] | None] = {}  # topic -> key -> partition, or None
    for topic, key, value, headers, partition in messages:
        listed = list(headers.items()) if isinstance(headers, Mapping) else list(headers or ())
        if _surely_fits(client, key, value, listed):
            key_bytes, value_bytes = key, value
        else:
            key_bytes, value_bytes = client._serialize(key, value, listed)  # checks the size
        if partition is None:
            if topic not in partitions:
                await client.client._wait_on_metadata(topic)
                metadata = client._metadata
                partitions[topic] = (
                    list(metadata.partitions_for_topic(topic)),
                    list(metadata.available_partitions_for_topic(topic)),
                )
                by_key[topic] = _key_partitions(client, topic, partitions[topic][0])
            known = None if key_bytes is None else by_key[topic]
            partition = None if known is None else known.get(key_bytes)
            if partition is None:
                partition = client._partitioner(key_bytes, *partitions[topic])
                if known is not None and len(known) < KEY_CACHE_SIZE:
                    known[key_bytes] = partition
        routed[topic, partition].append((key_bytes, value_bytes, listed))
    return {TopicPartition(*tp): records for tp, records in routed.items()}


def _surely_fits(client: AIOKafkaProducer, key: Any, value: Any, headers: list) -> bool:
    """True for bytes that ``client._serialize`` would pass through unchanged and whose
    record is far below the producer's size cap (its exact estimate costs a Python call
    per message); anything else goes through ``_serialize``."""
    if headers or client._key_serializer or client._value_serializer:
        return False
    if not isinstance(value, bytes) or not (key is None or isinstance(key, bytes)):
        return False
    size = len(value) + (len(key) if key else 0)
    return size + RECORD_OVERHEAD_BOUND <= client._max_request_size


def _key_partitions(
    client: AIOKafkaProducer, topic: str, partitions: list[int]
) -> dict[bytes, int] | None:
    """The remembered partition of each key of ``topic`` (aiokafka's murmur2 is pure
    Python, and a sensor's key recurs in every batch): kept while the topic's partitions
    stay the same, and only for the default partitioner, whose choice for a key depends on
    the key and the partitions alone. Any other partitioner: None (asked every time)."""
    if type(client._partitioner) is not DefaultPartitioner:
        return None
    cache = _KEY_PARTITIONS.setdefault(client, {})
    held = cache.get(topic)
    if held is None or held[0] != partitions:
        held = cache[topic] = (partitions, {})
    return held[1]


async def _submit(
    client: AIOKafkaProducer,
    tp: TopicPartition,
    records: list[_Record],
    futures: list[asyncio.Future],
) -> None:
    """Queue ``records`` for ``tp`` in full batches; their delivery futures go to
    ``futures``."""
    batch = client.create_batch()
    for key, value, headers in records:
        if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
            futures.append(await client.send_batch(batch, tp.topic, partition=tp.partition))
            batch = client.create_batch()  # a record always fits an empty batch
            batch.append(key=key, value=value, timestamp=None, headers=headers)
    batch.close()  # ready at once, and nothing else is appended to it
    futures.append(await client.send_batch(batch, tp.topic, partition=tp.partition))


class _DirectConsumer(_Consumer):
    yield_every = 1000  # records between yields to the event loop (Faust: 100)

    async def _drain_messages(self, fetcher: Any) -> None:
        """Faust's loop from fetched records to the conductor, without its
        ``wait_first`` per record (four tasks each, which capped consumption at ~7,000
        records/s): each record's callback is awaited directly. Faust's version stops
        waiting for a callback when a rebalance suspends the flow; here a callback that
        waited through a rebalance does not move the read offset (the rebalance seeks to
        the committed offsets), and its stale message is dropped by generation (as
        streams and :mod:`streams.intake` drop them)."""
        callback = self.callback
        app = self.app
        read_offset = self._read_offset
        acks_enabled_for = app.topics.acks_enabled_for
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                self.diag.set_flag(faust_consumer.CONSUMER_FETCHING)
                records = self.getmany(timeout=1.0)
                await self.sleep(0)
                if not self.should_stop:
                    await self._deliver(records, callback, read_offset, acks_enabled_for)
                self.diag.unset_flag(faust_consumer.CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(faust_consumer.CONSUMER_FETCHING)

    async def _deliver(
        self, records: Any, callback: Any, read_offset: Any, acks_enabled_for: Any
    ) -> None:
        app = self.app
        commit_every = self._commit_every
        since_yield = 0
        async for tp, message in records:
            since_yield += 1
            if since_yield > self.yield_every:
                await asyncio.sleep(0)
                since_yield = 0
            offset = message.offset
            last = read_offset[tp]
            if last is not None and offset < last:
                continue  # read already (Faust's "DROPPED MESSAGE")
            if last and offset - last > 1 and acks_enabled_for(message.topic):
                await self._add_gap(tp, last + 1, offset)
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
            await callback(message)
            if self.flow_active and message.generation_id == app.consumer_generation_id:
                read_offset[tp] = offset


class DirectTransport(Transport):
    """:class:`Transport` whose consumer hands records to the conductor without Faust's
    per-record ``wait_first``: what lets :mod:`streams.intake` take ~30,000 records/s on
    the 2-core machine (~6,000 with Faust's consumer)."""

    Consumer = _DirectConsumer

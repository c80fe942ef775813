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
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer
from faust.transport.drivers import aiokafka as faust_kafka

FETCH_WAIT_MS = 10


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

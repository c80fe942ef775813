"""Faust's Kafka transport with a short fetch wait.

Faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500``: a broker may hold a
fetch that long when no data is waiting, and tansu does, which put ~0.4 s between a
reading and its prediction at low traffic. This transport sets the wait to
``FETCH_WAIT_MS`` through Faust's own extension points (Transport.Consumer and its
consumer thread); under load fetches return at once either way.

Its consumer also leaves holes in a partition to the worker rather than acknowledging
them (see :mod:`streams.ordering`).
"""

from __future__ import annotations

from typing import Any

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
    Consumer = _Consumer

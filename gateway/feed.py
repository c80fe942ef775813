"""Every gateway reads all of `predictions` and `drift-events` (no consumer group), so
gateways scale out behind a load balancer and each can serve any subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from opentelemetry.trace import SpanKind

from forecast import tracing
from forecast.kafka import refresh_metadata
from forecast.settings import Settings
from forecast.tracing import TRACER
from gateway.hub import Hub

log = logging.getLogger(__name__)

FETCH_WAIT_MS = 10
ROUTE_CHUNK = 100  # messages routed between yields to the event loop


class Feed:
    """Pushes live predictions and drift events from Kafka into the hub."""

    def __init__(self, settings: Settings, bootstrap: str, hub: Hub) -> None:
        self.hub = hub
        self.predictions = settings.topic("predictions")
        self.drift = settings.topic("drift-events")
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            group_id=None,
            fetch_max_wait_ms=FETCH_WAIT_MS,  # the broker may hold an empty fetch this long
        )
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.consumer.start()
        partitions = []
        for topic in (self.predictions, self.drift):
            ids = self.consumer.partitions_for_topic(topic)
            if ids is None:
                await refresh_metadata(self.consumer)
                ids = self.consumer.partitions_for_topic(topic) or set()
            partitions += [TopicPartition(topic, p) for p in sorted(ids)]
        self.consumer.assign(partitions)
        await self.consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the positions now, so nothing published later is missed
            await self.consumer.position(tp)
        self._task = asyncio.create_task(self._run(), name="gateway-feed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()

    async def _run(self) -> None:
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=500, max_records=5000)
            except KafkaError as exc:
                log.warning("gateway feed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for tp, records in batches.items():
                for start in range(0, len(records), ROUTE_CHUNK):
                    for record in records[start : start + ROUTE_CHUNK]:
                        self._traced_route(tp.topic, record.value, record.headers)
                    await asyncio.sleep(0)  # let the subscribers' senders drain

    def _traced_route(self, topic: str, value: bytes | None, headers) -> None:
        """Route a record; inside a delivery span continuing the worker's trace, if any."""
        context = tracing.extract(headers)
        if context is None:
            self._route(topic, value)
            return
        with TRACER.start_as_current_span("deliver", context=context, kind=SpanKind.CONSUMER):
            self._route(topic, value)

    def _route(self, topic: str, value: bytes | None) -> None:
        try:
            message = orjson.loads(value or b"")
            if topic == self.predictions:
                self.hub.publish_prediction(message, value)
            else:
                self.hub.publish_event(message["sensor_id"], value)
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.error("gateway feed: unreadable message on %s: %s", topic, exc)

"""The Faust worker: consume `readings` in micro-batches, store, publish, then acknowledge.

Order of a batch (why offsets never run ahead of the sink):
0. admit each partition's records only in offset order (:mod:`streams.ordering`): what
   follows a hole the consumer left is held back, and the partition is read again;
1. validate and forecast (pure, :mod:`streams.pipeline`);
2. write readings and predictions to ClickHouse, retrying with backoff while the store
   fails; consumption waits meanwhile (backpressure, no unbounded buffer);
3. publish predictions and rejections (`predictions`, `readings.dlq`) and wait for acks;
4. log a snapshot of each touched sensor's state to the Faust table's changelog (which
   makes it recoverable after a crash; the live state stays in the worker's cache);
5. acknowledge the records, so Faust commits their offsets.
A crash anywhere before 5 re-delivers the batch; the deterministic keys and insert tokens
of the store, and the per-sensor ``seq`` that subscribers de-duplicate on, absorb it.

Store and broker failures that may pass are retried with backoff. Anything else is a
fault: the worker sets :attr:`Worker.failed` and stops taking records, and the process
exits non-zero so that its supervisor restarts it from the committed offsets.

A dead letter carries the record's raw bytes (for a batch element: that element), its
key, and headers ``dlq.reason``, ``dlq.detail``, ``dlq.topic``, ``dlq.partition``,
``dlq.offset`` and, for batch elements, ``dlq.index``. An oversize record keeps only its
first 64 KiB, with its full size in ``dlq.original_size``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence

import faust
import orjson
from aiokafka.errors import KafkaError
from faust.exceptions import ProducerSendError
from faust.types import EventT
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind
from prometheus_client import Counter as PromCounter
from yarl import URL

from forecast import metrics, tracing
from forecast.errors import StoreError
from forecast.schemas import DriftEvent
from forecast.settings import Settings
from forecast.tracing import TRACER
from sinks.clickhouse import Store, batch_token
from streams.drift import DriftMonitor
from streams.ordering import OffsetOrder
from streams.pipeline import BatchProcessor, BatchResult, ModelSet, RawRecord
from streams.residuals import ResidualTracker
from streams.state import SensorState
from streams.transport import Transport
from streams.validate import Limits, Rejection

log = logging.getLogger(__name__)

MAX_BACKOFF = 5.0
DLQ_MAX_VALUE = 64 * 1024


class SensorStateTable(faust.Table):
    """Per-sensor state snapshots, written once per batch, outside per-event iteration.

    The worker keeps the live states in its cache and only logs their snapshots to the
    changelog; ``data`` holds the snapshots of sensors that are not live: restored from
    the changelog after a restart, or handed back when partitions are revoked. Keeping a
    snapshot beside every live state took 10,000 sensors to 1972 MiB (1251-1490 without).
    """

    def log_snapshot(self, partition: int, key: str, value: bytes) -> None:
        """Log ``key`` to the changelog partition of the record that carried it."""
        self.send_changelog(partition, key, value)

    def keep_snapshot(self, key: str, value: bytes) -> None:
        """Hold a snapshot locally (it is in the changelog already)."""
        self.data[key] = value

    def take_snapshot(self, key: str) -> bytes | None:
        """Remove and return the local snapshot of ``key``, if any."""
        return self.data.pop(key, None)


class Worker:
    """Owns the Faust app, the state table and the agent; needs a started Store."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        store: Store,
        models: Callable[[], ModelSet],
    ) -> None:
        self.settings = settings
        self.store = store
        self.failed = asyncio.Event()
        self.failure: BaseException | None = None
        self.cache: dict[str, SensorState] = {}
        self.app = faust.App(
            settings.topic("forecast-worker"),
            broker=f"kafka://{bootstrap}",
            store="memory://",
            topic_partitions=settings.kafka_partitions,
            web_enabled=False,
            broker_session_timeout=settings.kafka_session_timeout,
            broker_heartbeat_interval=settings.kafka_session_timeout / 6,
            broker_rebalance_timeout=settings.kafka_session_timeout,
            producer_acks=-1,
            stream_wait_empty=False,  # unacknowledged records are re-delivered anyway
            loop=asyncio.get_running_loop(),
        )
        self.app.transport = Transport(
            [URL(f"kafka://{server}") for server in bootstrap.split(",")],
            self.app,
            loop=asyncio.get_running_loop(),
        )
        self.table = self.app.tables.add(
            SensorStateTable(
                self.app,
                name="sensor-state",
                beacon=self.app.tables.beacon,
                partitions=settings.kafka_partitions,
                schema=faust.Schema(key_type=str, key_serializer="raw", value_serializer="raw"),
                value_type=bytes,  # a JSON snapshot, taken when the batch is done
                help="Per-sensor state of the forecasters.",
            )
        )
        self.processor = BatchProcessor(
            models,
            Limits(
                settings.max_record_bytes,
                settings.max_batch_readings,
                settings.max_future,
                settings.sensor_patterns,
            ),
            settings.allowed_lateness,
            self._load_state,
            tracker=ResidualTracker(settings.horizons),
            drift=DriftMonitor(settings.drift_config()),
        )
        self.on_drift: Callable[[list[DriftEvent]], None] | None = None  # the retrain loop
        self.readings_topic = self.app.topic(
            settings.topic("readings"),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.kafka_partitions,
        )
        self.order = OffsetOrder(self._committed)
        self.app.agent(self.readings_topic, name="ingest")(self._ingest)
        self.app.timer(1.0, name="reread-holes")(self._reread_holes)
        self.app.on_partitions_revoked.connect(self._on_revoked)

    async def start(self) -> None:
        await self.app.start()

    async def stop(self) -> None:
        await self.app.stop()

    async def _on_revoked(self, app: faust.App, revoked: set, **kwargs: object) -> None:
        """Hand the live states back to the table: whichever partitions return to this
        worker are then brought up to date by Faust's recovery from the changelog."""
        for sensor_id, state in self.cache.items():
            self.table.keep_snapshot(sensor_id, state.to_bytes())
        self.cache.clear()
        self.order.forget(revoked)

    async def _ingest(self, stream: faust.StreamT) -> None:
        async for events in stream.noack_take(
            self.settings.batch_max, within=self.settings.batch_window
        ):
            started = time.perf_counter()
            admission = self.order.sort(events, lambda e: (e.message.tp, e.message.offset))
            await self._reread(admission.rewind)
            if admission.admitted:
                try:
                    await self.handle(admission.admitted)
                except Exception as exc:  # a fault: stop, rather than skip or ack the batch
                    log.exception("worker stopped by a fault; the batch will be re-delivered")
                    self.failure = exc
                    self.failed.set()
                    return
            for event in (*admission.admitted, *admission.repeated):
                await stream.ack(event)
            metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
            metrics.BATCH_RECORDS.observe(len(admission.admitted))

    def _committed(self, tp: object) -> int | None:
        """Faust's committed offset of a partition (the next to read), if it knows one."""
        return self.app.consumer._committed_offset.get(tp)

    async def _reread_holes(self) -> None:
        rewind, passed = self.order.overdue()
        for tp, first, last in passed:
            log.warning(
                "offsets %d-%d of %s stayed missing when read again: passed", first, last, tp
            )
            await self.app.consumer.pass_hole(tp, first, last)
        await self._reread(rewind)

    async def _reread(self, positions: dict) -> None:
        """Read partitions again from an offset the consumer skipped (see streams.ordering)."""
        for tp, offset in positions.items():
            log.info("reading %s again from offset %d: the consumer skipped records", tp, offset)
            metrics.REREADS.inc()
            try:
                await self.app.consumer.seek(tp, offset)
            except KafkaError as exc:  # revoked meanwhile: its next owner starts afresh
                log.warning("could not read %s again: %s", tp, exc)
                self.order.forget([tp])

    async def handle(self, events: Sequence[EventT]) -> BatchResult:
        """Process, store and publish one batch; returns once all of it is durable."""
        messages = [event.message for event in events]
        records = [RawRecord(m.topic, m.partition, m.offset, m.key, m.value) for m in messages]
        with TRACER.start_as_current_span(
            "batch", kind=SpanKind.CONSUMER, links=_links(messages)
        ) as span:
            span.set_attribute("messaging.batch.message_count", len(records))
            result = self.processor.process(records)
            token = batch_token((r.topic, r.partition, r.offset) for r in records)
            with TRACER.start_as_current_span("sink"):
                started = time.perf_counter()
                await self._store(result, token)
                metrics.SINK_FLUSH_SECONDS.observe(time.perf_counter() - started)
            with TRACER.start_as_current_span("publish", kind=SpanKind.PRODUCER):
                await self._publish(result, tracing.inject())
        published = time.time()
        for message in messages:
            metrics.EVENT_TO_PREDICTION.observe(max(0.0, published - message.timestamp))
        self._export_lag(messages)
        for sensor_id, (partition, state) in result.touched.items():
            self.cache[sensor_id] = state
            self.table.log_snapshot(partition, sensor_id, state.to_bytes())
        self._count(result)
        if result.drift and self.on_drift is not None:
            self.on_drift(result.drift)
        return result

    async def _store(self, result: BatchResult, token: str) -> None:
        def write() -> Awaitable[None]:
            return asyncio.to_thread(
                self.store.write_batch,
                result.readings,
                result.predictions + result.shadow,
                token,
                result.drift,
            )

        await with_backoff(
            write, lambda exc: isinstance(exc, StoreError), "store write", metrics.SINK_ERRORS
        )

    async def _publish(self, result: BatchResult, headers: list[tuple[str, bytes]]) -> None:
        trace_headers = headers or None
        messages = [
            (
                self.settings.topic("predictions"),
                p.sensor_id.encode(),
                orjson.dumps(p.to_message()),
                trace_headers,
            )
            for p in result.predictions
        ]
        messages += [
            dead_letter(self.settings.topic("readings.dlq"), record, rejection)
            for record, rejection in result.rejected
        ]
        messages += [
            (
                self.settings.topic("drift-events"),
                event.sensor_id.encode(),
                orjson.dumps(event.to_message()),
                trace_headers,
            )
            for event in result.drift
        ]
        if not messages:
            return

        async def send() -> None:
            sent = [
                await self.app.producer.send(topic, key, value, None, None, headers)
                for topic, key, value, headers in messages
            ]
            await asyncio.gather(*sent)

        await with_backoff(send, _retriable_send, "publish")

    def _export_lag(self, messages: Sequence) -> None:
        last = {m.tp: m.offset for m in messages}  # the batch is in order per partition
        for tp, offset in last.items():
            highwater = self._highwater(tp)
            if highwater is not None:
                lag = max(0, highwater - offset - 1)
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)

    def _highwater(self, tp) -> int | None:
        try:
            return self.app.consumer.highwater(tp)
        except (AssertionError, KeyError):  # not assigned (a rebalance): next batch
            return None

    def _count(self, result: BatchResult) -> None:
        for outcome, count in result.outcomes.items():
            if outcome == "forecast_failed":
                metrics.FORECAST_FAILURES.inc(count)
            else:
                metrics.READINGS.labels(outcome, "").inc(count)
        for _, rejection in result.rejected:
            metrics.READINGS.labels("rejected", rejection.reason).inc()
        scored: dict[tuple, list] = defaultdict(list)
        for r in result.residuals:  # grouped: one label lookup per model, stage and step
            scored[(r.model, r.stage, str(r.horizon))].append(r)
        for labels, residuals in scored.items():
            histogram = metrics.RESIDUAL_ERRORS.labels(*labels)
            for r in residuals:
                histogram.observe(abs(r.error))
            hits = sum(r.covered for r in residuals)
            metrics.RESIDUAL_COVERED.labels(*labels, "true").inc(hits)
            metrics.RESIDUAL_COVERED.labels(*labels, "false").inc(len(residuals) - hits)
        for event in result.drift:
            metrics.DRIFT_EVENTS.labels(event.detector, event.signal).inc()
        if result.residuals:
            for sensor_id, (_, state) in result.touched.items():
                for model, _, horizon, mae, coverage in self.processor.tracker.online(
                    state.residuals
                ):
                    metrics.ONLINE_MAE.labels(sensor_id, model, horizon).set(mae)
                    metrics.ONLINE_COVERAGE.labels(sensor_id, model, horizon).set(coverage)
        for reason, count in result.fallbacks.items():
            metrics.FALLBACKS.labels(reason).inc(count)
        for model, count in Counter(p.model for p in result.predictions).items():
            metrics.PREDICTIONS.labels(model).inc(count)
        stored = result.predictions + result.shadow
        metrics.SINK_ROWS.labels("readings").inc(len(result.readings))
        metrics.SINK_ROWS.labels("predictions").inc(sum(len(p.yhat) for p in stored))

    def _load_state(self, sensor_id: str) -> SensorState | None:
        state = self.cache.get(sensor_id)
        if state is None:
            doc = self.table.take_snapshot(sensor_id)
            if doc is not None:
                state = self.cache[sensor_id] = SensorState.from_bytes(doc)
        return state


async def with_backoff(
    attempt: Callable[[], Awaitable[None]],
    retriable: Callable[[Exception], bool],
    what: str,
    failures: PromCounter | None = None,
) -> None:
    """Run ``attempt`` until it succeeds, sleeping 0.1 s doubling to MAX_BACKOFF between
    retriable failures (the batch, and so consumption, waits meanwhile)."""
    delay = 0.1
    while True:
        try:
            await attempt()
            return
        except Exception as exc:
            if not retriable(exc):
                raise
            if failures is not None:
                failures.inc()
            log.warning("%s failed, retrying in %.1fs: %s", what, delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)


def _retriable_send(exc: Exception) -> bool:
    cause = exc.__cause__
    return isinstance(exc, ProducerSendError) and isinstance(cause, KafkaError) and cause.retriable


def dead_letter(
    topic: str, record: RawRecord, rejection: Rejection
) -> tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]:
    """The DLQ message for one rejected record or batch element."""
    if rejection.index is not None:
        value = orjson.dumps(rejection.element, default=str)
    else:
        value = record.value or b""
    headers = [
        ("dlq.reason", rejection.reason.encode()),
        ("dlq.detail", rejection.detail.encode()),
        ("dlq.topic", record.topic.encode()),
        ("dlq.partition", str(record.partition).encode()),
        ("dlq.offset", str(record.offset).encode()),
    ]
    if rejection.index is not None:
        headers.append(("dlq.index", str(rejection.index).encode()))
    if len(value) > DLQ_MAX_VALUE:
        headers.append(("dlq.original_size", str(len(value)).encode()))
        value = value[:DLQ_MAX_VALUE]
    return topic, record.key, value, headers


def _links(messages: Sequence) -> list[Link]:
    """Links to the traces of the readings' producers (at most 32 per batch)."""
    links = []
    for message in messages:
        headers = message.headers or ()
        context = tracing.extract(headers.items() if isinstance(headers, dict) else headers)
        if context is not None:
            span_context = trace.get_current_span(context).get_span_context()
            if span_context.is_valid:
                links.append(Link(span_context))
                if len(links) == 32:
                    break
    return links

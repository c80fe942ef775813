"""The Faust worker: consume `readings` in micro-batches, publish, then acknowledge.

Order of a batch (why offsets never run ahead of what is durable):
0. admit each partition's records only in offset order (:mod:`streams.ordering`): what
   follows a hole the consumer left is held back, and the partition is read again;
1. validate and forecast (pure, :mod:`streams.pipeline`);
2. publish predictions, rejections and drift events (`predictions`, `readings.dlq`,
   `drift-events`), and the batch's rows for the sink (`store.<table>`, Arrow tables, see
   :mod:`sinks.batches`), and wait for the broker's acknowledgements; the worker never
   waits for ClickHouse (the sink, :mod:`sinks.consumer`, is a consumer group of its own);
3. log a snapshot of each touched sensor's state to the Faust table's changelog (which
   makes it recoverable after a crash; the live state stays in the worker's cache);
4. acknowledge the records, so Faust commits their offsets.
A crash anywhere before 4 re-delivers the batch; the deterministic keys of the store's
tables, the views that de-duplicate, and the per-sensor ``seq`` that subscribers
de-duplicate on, absorb it.

Broker failures that may pass are retried with backoff. Anything else is a
fault: the worker sets :attr:`Worker.failed` and stops taking records, and the process
exits non-zero so that its supervisor restarts it from the committed offsets.

A watch task probes the assigned partitions' end offsets every second
(:mod:`streams.liveness`): no progress for ``FORECAST_STALL_TIMEOUT`` seconds fails the
``consuming`` readiness check, ``FORECAST_STALL_EXIT`` seconds of it is a fault, and so,
at once, are a crashed Faust service (its table recovery) and a broker that lost the
data this worker had read.

A dead letter carries the record's raw bytes (for a batch element: that element), its
key, and headers ``dlq.reason``, ``dlq.detail``, ``dlq.topic``, ``dlq.partition``,
``dlq.offset`` and, for batch elements, ``dlq.index``. An oversize record keeps only its
first 64 KiB, with its full size in ``dlq.original_size``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence

import faust
import orjson
from aiokafka.errors import KafkaError
from faust.exceptions import ConsistencyError, ConsumerNotStarted, ProducerSendError
from faust.types import EventT
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind
from prometheus_client import Counter as PromCounter
from yarl import URL

from forecast import metrics, tracing
from forecast.kafka import Transport, committed_offset
from forecast.schemas import DriftEvent
from forecast.settings import Settings
from forecast.tracing import TRACER
from sinks.batches import STORE_RECORD_BYTES, batch_tables, encode_chunks
from streams.drift import DriftMonitor
from streams.liveness import Liveness, WorkerStalled, describe_loss
from streams.ordering import OffsetOrder
from streams.pipeline import BatchProcessor, BatchResult, ModelSet, RawRecord
from streams.residuals import ResidualTracker
from streams.state import SensorState
from streams.validate import Limits, Rejection

log = logging.getLogger(__name__)

MAX_BACKOFF = 5.0
STOP_TIMEOUT = 5.0  # for Faust's own stop; the process has 10 s from SIGTERM to exit
PROBE_TIMEOUT = 2.0  # for the end offsets of the assigned partitions
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
    """Owns the Faust app, the state table and the agent."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        models: Callable[[], ModelSet],
    ) -> None:
        self.settings = settings
        self.failed = asyncio.Event()
        self.failure: BaseException | None = None
        self.cache: dict[str, SensorState] = {}
        self.app = faust.App(
            settings.topic(settings.worker_app),
            broker=f"kafka://{bootstrap}",
            store="memory://",
            # never the working directory; one folder per worker process
            datadir=str(settings.data_dir / "faust" / f"worker-{settings.worker_id}"),
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
        self.readings = settings.topic("readings")
        self.order = OffsetOrder(self._committed)
        self.app.agent(self.readings_topic, name="ingest")(self._ingest)
        self.app.timer(1.0, name="reread-holes")(self._reread_holes)
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.liveness = Liveness(settings.stall_timeout, settings.stall_exit)
        self.busy_since: float | None = None  # a batch between hand-over and ack
        self._watching: asyncio.Task | None = None
        self._warned_at = 0.0
        self.stopped = False  # Faust stopped within STOP_TIMEOUT

    async def start(self) -> None:
        self.app.conf.datadir.mkdir(parents=True, exist_ok=True)  # Faust makes one level only
        await self.app.start()
        self.liveness.progress_at = self.liveness.clock()  # the first rebalance starts now
        self._watching = asyncio.create_task(self._watch(), name="worker-liveness")

    async def stop(self) -> None:
        """Stop Faust, giving up after STOP_TIMEOUT: a broker that does not answer holds a
        commit or a group leave for a request timeout (90 s). Not ``wait_for``: it waits
        for the cancelled stop to finish, and Faust's stop does not finish on a cancel."""
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
        stopping = asyncio.ensure_future(self.app.stop())
        done, _ = await asyncio.wait([stopping], timeout=STOP_TIMEOUT)
        if done:
            stopping.result()
            self.stopped = True
        else:
            log.error("Faust did not stop within %.1fs; the worker stops without it", STOP_TIMEOUT)

    async def consuming(self) -> bool:
        """The readiness check: no fault, and progress within FORECAST_STALL_TIMEOUT."""
        return not self.failed.is_set() and not self.liveness.stalled()

    def fail(self, exc: BaseException) -> None:
        """Stop on a fault: the process exits non-zero and its supervisor restarts it."""
        if not self.failed.is_set():
            self.failure = exc
            self.failed.set()

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
            if admission.admitted or admission.repeated:
                self.liveness.took_in(
                    {e.message.tp: e.message.offset + 1 for e in admission.admitted}
                )
            await self._reread(admission.rewind)
            if admission.admitted:
                self.busy_since = time.monotonic()
                try:
                    await self.handle(admission.admitted)
                except Exception as exc:  # a fault: stop, rather than skip or ack the batch
                    log.exception("worker stopped by a fault; the batch will be re-delivered")
                    self.fail(exc)
                    return
                finally:
                    self.busy_since = None
            for event in (*admission.admitted, *admission.repeated):
                await stream.ack(event)
            metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
            metrics.BATCH_RECORDS.observe(len(admission.admitted))

    async def _watch(self) -> None:
        """Probe progress every second (less when the stall timeout is short)."""
        interval = min(1.0, self.settings.stall_timeout / 5)
        probe: asyncio.Task | None = None
        try:
            while not self.failed.is_set():
                await asyncio.sleep(interval)
                try:
                    probe = await self._probe(probe)
                except Exception:  # keep watching: a watch that died would hide a stall
                    log.exception("liveness probe failed")
        finally:
            if probe is not None:
                probe.cancel()

    async def _probe(self, probe: asyncio.Task | None) -> asyncio.Task | None:
        """One look at the worker; returns the end-offsets request still in flight."""
        crashed = crashed_service(self.app)
        if crashed is not None:
            self._stalled(crashed)
            return probe
        try:
            tps = {tp for tp in self.app.consumer.assignment() if tp.topic == self.readings}
        except ConsumerNotStarted:
            tps = set()
        ends = None
        if tps:
            probe = probe or asyncio.create_task(self._ends(tps))
            await asyncio.wait([probe], timeout=PROBE_TIMEOUT)
            if probe.done():  # else still waiting: the broker did not answer yet
                ends, probe = probe.result(), None
        reached = dict(self.liveness.reached)  # before the fetched ends are looked at
        lost = self.liveness.observe(
            {tp: self._position(tp) for tp in tps},
            ends,
            fetched={tp: self._highwater(tp) for tp in tps},
            reached=reached,
            recovering=self.app.rebalancing,
        )
        if lost:
            metrics.BROKER_DATA_LOST.inc()
            self._stalled(describe_loss(lost))
        else:
            self._report()
        return probe

    async def _ends(self, tps: set) -> dict | None:
        """The end offsets of ``tps`` asked of the broker now, or None if it did not say."""
        try:
            return dict(await self.app.consumer.highwaters(*tps))
        except Exception as exc:  # any failure is the same answer: not known now
            log.debug("no end offsets: %s", exc)
            return None

    def _position(self, tp: object) -> int | None:
        """The next offset the worker takes in from ``tp``, if known."""
        expected = self.order.expected.get(tp)
        return expected if expected is not None else self._committed(tp)

    def _report(self) -> None:
        idle = self.liveness.idle_for()
        stalled = self.liveness.stalled()
        metrics.WORKER_IDLE_SECONDS.set(idle)
        metrics.WORKER_STALLED.set(int(stalled))
        if not stalled:
            self._warned_at = 0.0
            return
        cause = self.liveness.cause or "no records taken in"
        if self.busy_since is not None:
            busy = time.monotonic() - self.busy_since
            cause += f"; a batch has waited {busy:.0f}s for the store or the broker"
        if self.liveness.expired():
            self._stalled(
                f"no progress for {idle:.0f}s (FORECAST_STALL_EXIT="
                f"{self.settings.stall_exit:g}): {cause}"
            )
        elif time.monotonic() - self._warned_at >= 10.0:
            self._warned_at = time.monotonic()
            log.warning("worker stalled: no progress for %.0fs: %s", idle, cause)

    def _stalled(self, reason: str) -> None:
        metrics.WORKER_STALLED.set(1)
        log.error("worker stopped: %s", reason)
        self.fail(WorkerStalled(reason))

    def _committed(self, tp: object) -> int | None:
        """Faust's committed offset of a partition (the next to read), if it knows one."""
        return committed_offset(self.app.consumer, tp)

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
            with TRACER.start_as_current_span("publish", kind=SpanKind.PRODUCER):
                await self._publish(result, tracing.inject(), messages[0].partition)
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

    async def _publish(
        self, result: BatchResult, headers: list[tuple[str, bytes]], partition: int
    ) -> None:
        """Everything the batch produced, on its topics; returns once the broker has it."""
        trace_headers = headers or None
        messages: list[tuple] = [
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
        routed = [(*message, None) for message in messages]  # the partition of the key
        tables = batch_tables(result.readings, result.predictions + result.shadow, result.drift)
        routed += [
            (self.settings.topic(f"store.{name}"), None, chunk, None, partition)
            for name, table in tables.items()
            for chunk in encode_chunks(table, STORE_RECORD_BYTES)
        ]
        if not routed:
            return

        async def send() -> None:
            sent = [
                await self.app.producer.send(topic, key, value, at, None, headers)
                for topic, key, value, headers, at in routed
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


def crashed_service(app: faust.App) -> str | None:
    """Why a service of ``app`` crashed (mode marks the app when its table recovery
    crashes, then leaves it running without consuming), or None."""
    recovery = app.tables.recovery
    for service in (recovery, app):
        if service.crashed:
            reason = service.crash_reason
            hint = ""
            if isinstance(reason, ConsistencyError):
                hint = " (the broker lost the changelog's data: a restart starts afresh)"
            return f"Faust's {service.shortlabel} crashed: {reason!r}{hint}"
    return None


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

"""The Faust worker: consume `readings` in micro-batches, publish, then acknowledge.

Order of a batch (why offsets never run ahead of what is durable):
0. admit each partition's records only in offset order (:mod:`streams.ordering`): what
   follows a hole the consumer left is held back, and the partition is read again;
1. validate and forecast (pure, :mod:`streams.pipeline`);
2. publish predictions, rejections and drift events (`predictions`, `readings.dlq`,
   `drift-events`), and the batch's rows for the sink (`store.<table>`, Arrow tables, see
   :mod:`sinks.batches`): batches are sent strictly in order, and the next batch is
   processed while the broker acknowledges (:class:`SendChain`); the worker never waits
   for ClickHouse (the sink, :mod:`sinks.consumer`, is a consumer group of its own);
3. at a checkpoint (every ``FORECAST_SNAPSHOT_INTERVAL`` seconds, when partitions are
   revoked, and at the stop): take a snapshot of each sensor advanced since the last one
   and send them to the Faust table's changelog (which makes them recoverable after a
   crash; the live state stays in the engine's columns), in chunks between the batches
   that go on meanwhile, then
4. once the broker acknowledged the snapshots and every batch sent before them,
   acknowledge the records the checkpoint covers, so Faust commits their offsets.
A crash anywhere before 4 re-delivers what the last checkpoint did not cover; the state
it restores is the one those records found, so they give the same predictions again: the
deterministic keys of the store's tables, the views that de-duplicate, and the per-sensor
``seq`` that subscribers de-duplicate on, absorb them. A sensor advanced by many batches
between two checkpoints is written once.

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
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

import faust
import numpy as np
import orjson
from aiokafka.errors import KafkaError, KafkaTimeoutError
from faust.exceptions import ConsistencyError, ConsumerNotStarted, ProducerSendError
from faust.types import Message
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind
from prometheus_client import Counter as PromCounter
from yarl import URL

from forecast import metrics, tracing
from forecast.kafka import DirectTransport, committed_offset, send_many
from forecast.schemas import DriftEvent
from forecast.settings import Settings
from forecast.tracing import TRACER
from models.online import OnlineConfig
from sinks.batches import STORE_RECORD_BYTES, block_tables, encode_chunks
from streams import snapshots
from streams.engine import BatchOutput, Engine
from streams.intake import BatchIntake
from streams.liveness import Liveness, WorkerStalled, describe_loss
from streams.ordering import OffsetOrder
from streams.pipeline import ModelSet, RawRecord
from streams.validate import Limits, Rejection

log = logging.getLogger(__name__)

# A batch's messages go out in record batches of up to this size (Faust's and Kafka's
# default is 16 KiB, about 16 predictions). A broker's fetch cost grows with the record
# batches it holds (tansu's memory engine scans them), and every batch is a header and a
# CRC more; the messages of a batch are sent at once either way, so nothing waits longer.
PRODUCER_BATCH_BYTES = 512 * 1024

MAX_BACKOFF = 5.0
STOP_TIMEOUT = 5.0  # for Faust's own stop; the process has 10 s from SIGTERM to exit
CHECKPOINT_TIMEOUT = 1.0  # for the last checkpoint at the stop
PROBE_TIMEOUT = 2.0  # for the end offsets of the assigned partitions
DLQ_MAX_VALUE = 64 * 1024
ONLINE_EVERY = 1.0  # seconds between exports of the per-sensor online error gauges
CHECKPOINT_CHUNK = 200  # snapshots taken between two batches (~10 ms of the event loop)


class SensorStateTable(faust.Table):
    """Per-sensor state snapshots, written at checkpoints, outside per-event iteration.

    The worker keeps the live states in its columns and only sends their snapshots to the
    changelog (:meth:`Worker._write_checkpoint`); ``data`` holds the snapshots of sensors
    that are not live: restored from the changelog after a restart, or handed back when
    partitions are revoked. Keeping a snapshot beside every live state took 10,000
    sensors to 1972 MiB (1251-1490 without).
    """

    def keep_snapshot(self, key: str, value: bytes) -> None:
        """Hold a live state's snapshot locally (it is in the changelog already), unless
        the table holds a newer one: standby replication of another worker's changelog
        may have brought it while this worker still held the partition's old state."""
        held = self.data.get(key)
        if held is None or snapshots.clock(value) > snapshots.clock(held):
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
        self.batch_lock = asyncio.Lock()  # a rebalance waits for the batch in hand
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
            producer_max_batch_size=PRODUCER_BATCH_BYTES,
            stream_wait_empty=False,  # unacknowledged records are re-delivered anyway
            loop=asyncio.get_running_loop(),
        )
        self.app.transport = DirectTransport(
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
        self.processor = Engine(
            models,
            Limits(
                settings.max_record_bytes,
                settings.max_batch_readings,
                settings.max_future,
                settings.sensor_patterns,
            ),
            settings.allowed_lateness,
            self._load_state,
            horizons=settings.horizons,
            drift=settings.drift_config(),
            online=online_config(settings),
        )
        self.on_drift: Callable[[list[DriftEvent]], None] | None = None  # the retrain loop
        self.on_online: Callable[[list], None] | None = None  # the online statistics, as exported
        self.readings = settings.topic("readings")
        self.intake = BatchIntake(
            self.app,
            self.readings,
            self._take,
            max_records=settings.batch_max,
            on_error=self._batch_failed,
            partitions=settings.kafka_partitions,
        )
        self.order = OffsetOrder(self._start)
        self.app.timer(1.0, name="reread-holes")(self._reread_holes)
        self.app.timer(ONLINE_EVERY, name="online-export")(self._export_online)
        every = max(0.05, settings.snapshot_interval / 2)
        self.app.timer(every, name="checkpoint")(self._checkpoint_timer)
        self.sends = SendChain(self._send)  # the batches' messages
        self.snapshot_sends = SendChain(self._send)  # the checkpoints' snapshots
        self.dirty: dict[str, int] = {}  # sensor -> partition: advanced since its snapshot
        self.held: list[Message] = []  # handled; acknowledged by the next checkpoint
        self.checkpoint_at = time.monotonic()
        self.checkpointing: asyncio.Task | None = None  # a checkpoint in the background
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.liveness = Liveness(settings.stall_timeout, settings.stall_exit)
        self.busy_since: float | None = None  # a batch between hand-over and ack
        self._watching: asyncio.Task | None = None
        self._warned_at = 0.0
        self.stopped = False  # Faust stopped within STOP_TIMEOUT
        self._scored: set[str] = set()  # sensors with residuals since the last export

    async def start(self) -> None:
        self.app.conf.datadir.mkdir(parents=True, exist_ok=True)  # Faust makes one level only
        await self.app.start()
        await self.intake.start()
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
        # A batch stuck on the broker holds the checkpoint: then what the last checkpoint
        # did not cover is read again by whoever takes the partitions.
        if not self.failed.is_set():  # after a fault, nothing is snapshot or acknowledged
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._checkpoint(wait=True), CHECKPOINT_TIMEOUT)
        await self.intake.stop()
        if self.checkpointing is not None:
            self.checkpointing.cancel()
            await asyncio.gather(self.checkpointing, return_exceptions=True)
        await self.snapshot_sends.cancel()
        await self.sends.cancel()
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
        """Hand the live states back to the table (after the batch in hand): whichever
        partitions return to this worker are then brought up to date by Faust's recovery
        from the changelog."""
        await self._settle_checkpoint()
        async with self.batch_lock:
            await self._write_checkpoint(locked=True)
            await self.sends.drain()
            for sensor_id, snapshot in self.processor.release().items():
                self.table.keep_snapshot(sensor_id, snapshot)
            self.order.forget(revoked)

    async def _take(self, messages: list[Message]) -> list[Message]:
        """One batch from the intake: admit in offset order, handle, and return what may
        be acknowledged (what was handled and what had been already; not what waits
        behind a hole)."""
        started = time.perf_counter()
        admission = self.order.sort(messages, lambda m: (m.tp, m.offset))
        if admission.admitted or admission.repeated:
            self.liveness.took_in({m.tp: m.offset + 1 for m in admission.admitted})
        await self._reread(admission.rewind)
        if admission.admitted:
            self.busy_since = time.monotonic()
            try:
                await self.handle(admission.admitted)
            finally:
                self.busy_since = None
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_RECORDS.observe(len(admission.admitted))
        self.held += admission.admitted
        self.held += admission.repeated
        self._checkpoint_if_due()
        return []  # acknowledged by the checkpoint that covers them

    async def _checkpoint_timer(self) -> None:
        self._checkpoint_if_due()

    def _checkpoint_if_due(self) -> None:
        """Start a checkpoint in the background once one is due (one at a time)."""
        if self.failed.is_set() or (self.checkpointing and not self.checkpointing.done()):
            return
        if self.held and time.monotonic() - self.checkpoint_at >= self.settings.snapshot_interval:
            self.checkpointing = asyncio.create_task(self._checkpoint(), name="checkpoint")

    async def _settle_checkpoint(self) -> None:
        """Wait for the checkpoint in the background, if any, to be written."""
        while self.checkpointing is not None and not self.checkpointing.done():
            await asyncio.wait([self.checkpointing])

    async def _checkpoint(self, wait: bool = False) -> None:
        """Write a checkpoint; with ``wait``, return once the broker acknowledged it."""
        try:
            if asyncio.current_task() is not self.checkpointing:
                await self._settle_checkpoint()
            await self._write_checkpoint()
            if wait:
                await self.sends.drain()
        except Exception as exc:  # a send that failed for good: a fault
            self._batch_failed(exc)

    async def _write_checkpoint(self, locked: bool = False) -> None:
        """Snapshot every sensor advanced since the last checkpoint and send the snapshots
        (beside the batches' messages, not behind them); once the broker acknowledged them
        and every batch sent before, acknowledge the records handled until then (Faust
        then commits their offsets). Returns before the broker acknowledged the batches:
        the next batches need not wait.

        The snapshots are taken :data:`CHECKPOINT_CHUNK` sensors at a time, each chunk
        between two batches (unless ``locked``: the caller holds the batch lock). A state
        a later batch advanced before its chunk is taken is newer than the records the
        checkpoint acknowledges, which is safe: records re-delivered after a crash that
        the state has seen are known by their offsets. (That sensor is snapshot again at
        the next checkpoint.)

        The last snapshot of each changelog partition goes out alone, as a record batch of
        its own: Faust's table recovery reads a changelog up to the end offset the broker
        reports, and tansu reports the first offset of the partition's last record batch
        + 1. Sent in one batch, the snapshots after its first were never read back, and a
        worker that took the partition over started those sensors from older states (a
        test saw a ``seq`` issued twice)."""
        lock = contextlib.nullcontext() if locked else self.batch_lock
        async with lock:
            dirty, self.dirty = self.dirty, {}
            held, self.held = self.held, []
            self.checkpoint_at = time.monotonic()
        last = {partition: sensor_id for sensor_id, partition in dirty.items()}
        alone = set(last.values())
        bulk = [sensor_id for sensor_id in dirty if sensor_id not in alone]
        for start in range(0, len(bulk), CHECKPOINT_CHUNK):
            async with lock:
                chunk = self._snapshot_messages(bulk[start : start + CHECKPOINT_CHUNK], dirty)
                await self.snapshot_sends.submit(chunk, _nothing)
        if not alone and not held:
            return
        async with lock:
            chunk = self._snapshot_messages(list(alone), dirty)
            await self.snapshot_sends.submit(chunk, _nothing, first=True)
        await self.snapshot_sends.drain()
        await self.sends.submit([], lambda: self.intake.ack(held))  # after the batches

    def _snapshot_messages(self, ids: list[str], partitions: dict[str, int]) -> list[tuple]:
        """The changelog messages of the snapshots of ``ids``, each to its partition, keyed
        as the table's own writes are (its key serializer: what its recovery reads)."""
        changelog = self.table.changelog_topic
        topic = changelog.get_topic_name()
        serializer = self.table.key_serializer
        with self.processor.stage("checkpoint"):
            taken = self.processor.snapshots(ids)
        return [
            (topic, changelog.prepare_key(key, serializer)[0], value, None, partitions[key])
            for key, value in zip(ids, taken, strict=True)
        ]

    def _batch_failed(self, exc: BaseException) -> None:
        """A fault: stop, rather than skip or acknowledge the batch."""
        log.error("worker stopped by a fault; the batch will be re-delivered", exc_info=exc)
        self.fail(exc)

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

    def _start(self, tp: object) -> int:
        """Where a partition's records start for this worker: its committed offset, or,
        where the group never committed one, offset 0. Records fetched before a
        rebalance are dropped (a new generation), and Faust seeks only partitions with a
        committed offset back: the first record seen then is not the first there is.
        (Where retention removed the log's start, that hole is passed after re-reads.)"""
        committed = self._committed(tp)
        return 0 if committed is None else committed

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

    async def handle(self, messages: Sequence[Message]) -> BatchOutput:
        """Process one batch and hand its messages to the broker, in order after the
        batches before it; returns while they are on their way (a checkpoint waits for
        them: records are acknowledged once all they produced is durable)."""
        records = [RawRecord(m.topic, m.partition, m.offset, m.key, m.value) for m in messages]
        async with self.batch_lock:
            with TRACER.start_as_current_span(
                "batch", kind=SpanKind.CONSUMER, links=_links(messages)
            ) as span:
                span.set_attribute("messaging.batch.message_count", len(records))
                result = self.processor.process(records)
                publish = TRACER.start_span("publish", kind=SpanKind.PRODUCER)
                with trace.use_span(publish), self.processor.stage("serialize"):
                    routed = self._messages(result, tracing.inject() or None, records[0].partition)
            self.dirty.update(result.touched)
            if routed:
                with self.processor.stage("send"):
                    await self.sends.submit(routed, lambda: self._sent(messages, publish))
            else:
                publish.end()
        with self.processor.stage("metrics"):
            self._count(result)
        if result.drift and self.on_drift is not None:
            self.on_drift(result.drift)
        return result

    async def _send(self, routed: list[tuple]) -> None:
        await with_backoff(lambda: send_many(self.app.producer, routed), _retriable_send, "publish")

    def _sent(self, messages: Sequence[Message], publish: trace.Span) -> None:
        """A batch's messages are with the broker (its ``publish`` span ends)."""
        publish.end()
        published = time.time()
        for message in messages:
            metrics.EVENT_TO_PREDICTION.observe(max(0.0, published - message.timestamp))
        self._export_lag(messages)

    def _messages(
        self, result: BatchOutput, trace_headers: list | None, partition: int
    ) -> list[tuple]:
        """The batch's messages, routed: (topic, key, value, headers, partition)."""
        routed: list[tuple] = []  # partition None: the partition of the key
        if result.predictions is not None:
            topic = self.settings.topic("predictions")
            routed += [
                (topic, sensor_id.encode(), value, trace_headers, None)
                for sensor_id, value in zip(
                    result.predictions.sensor_id, result.predictions.messages(), strict=True
                )
            ]
        routed += [
            (*dead_letter(self.settings.topic("readings.dlq"), record, rejection), None)
            for record, rejection in result.rejected
        ]
        routed += [
            (
                self.settings.topic("drift-events"),
                event.sensor_id.encode(),
                orjson.dumps(event.to_message()),
                trace_headers,
                None,
            )
            for event in result.drift
        ]
        blocks = [b for b in (result.predictions, result.shadow) if b is not None]
        tables = block_tables(result.readings, blocks, result.drift)
        routed += [
            (self.settings.topic(f"store.{name}"), None, chunk, None, partition)
            for name, table in tables.items()
            for chunk in encode_chunks(table, STORE_RECORD_BYTES)
        ]
        return routed

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

    def _count(self, result: BatchOutput) -> None:
        for outcome, count in result.outcomes.items():
            if outcome == "forecast_failed":
                metrics.FORECAST_FAILURES.inc(count)
            elif count:
                metrics.READINGS.labels(outcome, "").inc(count)
        for reason, count in Counter(r.reason for _, r in result.rejected).items():
            metrics.READINGS.labels("rejected", reason).inc(count)
        for batch in result.residuals:  # one label lookup per model, stage and step
            scored = batch.scored
            errors, covered = np.abs(scored.error), scored.covered
            for number, stage in enumerate(scored.stage_names):
                for horizon in self.processor.horizons:
                    rows = (scored.stage == number) & (scored.horizon == horizon)
                    if not rows.any():
                        continue
                    labels = (batch.model, stage, str(horizon))
                    metrics.observe_many(metrics.RESIDUAL_ERRORS.labels(*labels), errors[rows])
                    hits = int(covered[rows].sum())
                    metrics.RESIDUAL_COVERED.labels(*labels, "true").inc(hits)
                    metrics.RESIDUAL_COVERED.labels(*labels, "false").inc(int(rows.sum()) - hits)
        for event in result.drift:
            metrics.DRIFT_EVENTS.labels(event.detector, event.signal).inc()
        if result.residuals:
            self._scored.update(result.touched)  # exported by the timer
        for reason, count in result.fallbacks.items():
            metrics.FALLBACKS.labels(reason).inc(count)
        if result.predictions is not None:
            for model, count in Counter(result.predictions.model).items():
                metrics.PREDICTIONS.labels(model).inc(count)

    async def _export_online(self) -> None:
        """The online MAE and coverage of the sensors scored since the last export (a
        gauge per sensor, model and step), every ONLINE_EVERY seconds: also when the
        stream has stopped, so the last batches' scores are not left out."""
        if not self._scored:
            return
        online = self.processor.online(self._scored)
        for sensor_id, model, horizon, mae, coverage, _ in online:
            metrics.ONLINE_MAE.labels(sensor_id, model, horizon).set(mae)
            metrics.ONLINE_COVERAGE.labels(sensor_id, model, horizon).set(coverage)
        self._scored.clear()
        if self.on_online is not None:
            self.on_online(online)

    def _load_state(self, sensor_id: str) -> dict | None:
        """A sensor's snapshot, restored from the changelog or handed back earlier."""
        doc = self.table.take_snapshot(sensor_id)
        return None if doc is None else snapshots.unpack(doc)


class SendChain:
    """Batches' messages sent strictly in order while the next batches are processed
    (the broker's round trip overlaps the work): what is submitted while a send is in
    flight goes out together in the next one, so a slow round trip makes the sends
    bigger, not more; at most ``depth`` batches wait. A ``first`` submission starts a
    send of its own (what was submitted before it is acknowledged first): its messages
    never share a record batch with earlier ones. A failure surfaces at the next
    :meth:`submit` or :meth:`drain`."""

    def __init__(self, send: Callable[[list], Awaitable[None]], depth: int = 4) -> None:
        self.send = send
        self.depth = depth
        self.waiting: list[tuple[list, Callable[[], None], bool]] = []
        self.room = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def submit(self, routed: list, on_sent: Callable[[], None], first: bool = False) -> None:
        """Queue ``routed``; ``on_sent`` runs once the broker acknowledged it (and
        everything submitted before it)."""
        while True:
            if self.task is not None and self.task.done():
                self.task.result()  # raises what an earlier send raised
            if len(self.waiting) < self.depth:
                break
            self.room.clear()
            await self.room.wait()
        self.waiting.append((routed, on_sent, first))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(), name="worker-sends")

    async def _run(self) -> None:
        try:
            while self.waiting:
                waiting = self.waiting
                cut = next((i for i, item in enumerate(waiting) if i and item[2]), len(waiting))
                taken, self.waiting = waiting[:cut], waiting[cut:]
                self.room.set()
                await self.send([message for routed, _, _ in taken for message in routed])
                for _, on_sent, _ in taken:
                    on_sent()
        finally:
            self.room.set()  # a submitter waiting for room sees the failure, if any

    async def drain(self) -> None:
        """Wait until every batch submitted is with the broker."""
        if self.task is not None:
            await self.task

    async def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.waiting.clear()


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


def online_config(settings: Settings) -> OnlineConfig | None:
    """How served forecasts adapt as their actuals arrive (FORECAST_ONLINE_*); None: not."""
    if settings.online_interval_rate == 0 and settings.online_bias_rate == 0:
        return None
    return OnlineConfig(
        horizon=len(settings.horizons),
        coverage=settings.online_coverage,
        interval_rate=settings.online_interval_rate,
        bias_rate=settings.online_bias_rate,
    )


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
    """Broker trouble that may pass: a retriable Kafka error, a timeout waiting for the
    broker (aiokafka marks it not retriable: its batch expired, and is sent again)."""
    if isinstance(exc, ProducerSendError):
        exc = exc.__cause__
    return isinstance(exc, KafkaTimeoutError) or (isinstance(exc, KafkaError) and exc.retriable)


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


def _nothing() -> None:
    """What follows a send that needs nothing done once it is acknowledged."""


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

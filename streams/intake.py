"""Batch intake: a Faust topic's records handed over in natural batches, without Events.

Faust stays the framework (app, consumer group, rebalances, tables, offset commits); the
intake replaces only the per-record path of an agent (an Event per record, a channel
queue, stream iteration, an ack per event), which capped consumption at ~4,400 records/s.

How it hooks Faust, through its public extension points only:

* :class:`BatchTopic` is a :class:`faust.Topic` registered with the conductor
  (``app.topics.add``): the consumer subscribes its topic, and the conductor's handler
  for each assigned partition delivers every message to the topic's ``decode`` and
  ``queue``. Here ``decode`` returns the :class:`~faust.types.Message` itself and the
  queue is the intake's buffer, so no Event is made.
* The buffer tracks each message it takes (``Consumer.track_message``, as a stream
  does) and tells the conductor it is ``full()`` at the high-water mark, so the
  conductor awaits ``BatchTopic.put`` and, with it, the consumer's fetch loop: memory
  stays bounded.
* The buffer is managed by ``app.flow_control``: Faust clears it when partitions are
  revoked (as it clears agents' queues) and seeks to the committed offsets after the
  rebalance, so what was dropped is read again. Messages fetched before the last
  rebalance (another ``generation_id``) are dropped too, as streams drop them. Flow
  control clears its queues again when it resumes, after that seek; the buffer then
  keeps what was fetched since (:meth:`MessageBuffer.clear`).
* A batch is acknowledged with ``Message.ack(consumer)``, as ``Event.ack`` does: Faust
  commits only acknowledged offsets.

Faust's consumer itself still awaits each record's delivery in a ``wait_first`` (four
tasks per record, ~6,000 records/s here, whatever the intake does); the app's transport
should be :class:`forecast.kafka.DirectTransport`, whose consumer awaits the delivery
directly (~30,000 records/s through the intake on this machine).

Create the intake before the app starts: the conductor subscribes its topics once, at
the start (a topic added later is subscribed only after a 45 s pause).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

import faust
from faust.types import TP, Message

log = logging.getLogger(__name__)

#: Record bytes in one batch at most (besides ``max_records``): a batch's memory, its
#: predictions' messages and its store rows follow its readings, and records of
#: thousands of readings each (a backfill) took a worker filling 10,000 sensors' windows
#: past 15 GiB in batches of 2,000 records (1.3 GiB with 1 MiB batches). 4 MiB is about
#: 60,000 readings; 1 MiB cost a fifth of the throughput of 100-reading records.
BATCH_BYTES = 4 << 20

#: Handles a batch; returns the messages to acknowledge, or None for all of them.
MessageHandler = Callable[[list[Message]], Awaitable[Iterable[Message] | None]]


class MessageBuffer:
    """The queue of a :class:`BatchTopic`, as the conductor and flow control use it."""

    def __init__(self, app: faust.App, high_water: int) -> None:
        self.app = app
        self.high_water = high_water
        self.messages: deque[Message] = deque()
        self.arrived = asyncio.Event()  # set while messages wait
        self.has_room = asyncio.Event()  # set while below the high-water mark
        self.has_room.set()

    def __len__(self) -> int:
        return len(self.messages)

    def full(self) -> bool:
        """At the high-water mark: the conductor then awaits :meth:`put`."""
        return len(self.messages) >= self.high_water

    def put_nowait_enhanced(
        self, value: Message, *, on_pressure_high: Callable, on_pressure_drop: Callable
    ) -> None:
        """The conductor's delivery while not :meth:`full`."""
        self._add(value)

    async def put(self, message: Message) -> None:
        """Add ``message`` once below the high-water mark."""
        while self.full():
            self.has_room.clear()
            await self.has_room.wait()
        self._add(message)

    def _add(self, message: Message) -> None:
        app = self.app
        if message.generation_id != app.consumer_generation_id:
            return  # fetched before the last rebalance: read again from the committed offset
        if not message.tracked and app.topics.acks_enabled_for(message.topic):
            message.tracked = True
            app.consumer.track_message(message)
        self.messages.append(message)
        self.arrived.set()

    async def take(self, limit: int, max_bytes: int = BATCH_BYTES) -> list[Message]:
        """Up to ``limit`` messages in arrival order, and no more of them than fit in
        ``max_bytes`` of values (but at least one); waits while there are none."""
        while not self.messages:
            self.arrived.clear()
            await self.arrived.wait()
        messages = self.messages
        taken = [messages.popleft()]
        size = len(taken[0].value or b"")
        while messages and len(taken) < limit:
            size += len(messages[0].value or b"")
            if size > max_bytes:
                break
            taken.append(messages.popleft())
        self._taken()
        generation = self.app.consumer_generation_id
        return [m for m in taken if m.generation_id == generation]

    def forget(self, tps: Collection[TP]) -> int:
        """Drop the messages of partitions ``tps``; returns how many."""
        kept = deque(m for m in self.messages if m.tp not in tps)
        dropped = len(self.messages) - len(kept)
        self.messages = kept
        self._taken()
        return dropped

    def clear(self) -> None:
        """What flow control calls on a rebalance (suspended): drop everything. It also
        calls this when it resumes, after the recovery has sought the partitions to
        their committed offsets: the messages fetched since then stay (those of an older
        generation go). Dropped there, a record fetched between the seek and the resume
        was never read again, and its partition stalled after a restart."""
        if self.app.flow_control.is_active():
            generation = self.app.consumer_generation_id
            self.messages = deque(m for m in self.messages if m.generation_id == generation)
        else:
            self.messages.clear()
        self._taken()

    def _taken(self) -> None:
        if not self.messages:
            self.arrived.clear()
        if not self.full():
            self.has_room.set()


class BatchTopic(faust.Topic):
    """A topic whose messages go to a :class:`MessageBuffer` as they are, not as Events."""

    def __init__(self, app: faust.App, *, buffer: MessageBuffer, **kwargs: Any) -> None:
        super().__init__(app, queue=buffer, **kwargs)  # type: ignore[arg-type]
        self.buffer = buffer
        self.decode = self._as_message  # what the conductor calls for each message

    async def _as_message(self, message: Message, *, propagate: bool = False) -> Message:
        return message

    async def put(self, event: Any) -> None:
        """The conductor's delivery while the buffer is full: waits for room."""
        await self.buffer.put(event)


class BatchIntake:
    """Consume ``topic`` in batches: ``await handler(messages)``, then acknowledge them
    (or only those the handler returns: ones held back for a re-read must not be).

    A batch is whatever arrived while the previous one was handled, at most
    ``max_records`` and :data:`BATCH_BYTES` of record values, in arrival order (offset
    order within a partition); when idle, the next message is handed over as soon as it
    arrives. Delivery waits while more than
    ``high_water`` messages (default ``4 * max_records``) are buffered.

    If ``handler`` raises, its batch is not acknowledged and the intake stops taking
    batches: :attr:`failure` holds the exception and ``on_error`` is called with it.
    """

    def __init__(
        self,
        app: faust.App,
        topic: str,
        handler: MessageHandler,
        *,
        max_records: int = 1000,
        high_water: int | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        partitions: int | None = None,
    ) -> None:
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        self.app = app
        self.handler = handler
        self.max_records = max_records
        self.on_error = on_error
        self.failure: BaseException | None = None
        self.buffer = MessageBuffer(app, high_water or 4 * max_records)
        self.topic = BatchTopic(
            app,
            buffer=self.buffer,
            topics=[topic],
            partitions=partitions,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )
        app.topics.add(self.topic)  # the consumer subscribes it when the app starts
        app.flow_control.manage_queue(self.buffer)  # type: ignore[arg-type]
        self._task: asyncio.Task | None = None

    @property
    def pending(self) -> int:
        """Messages buffered and not yet handed over."""
        return len(self.buffer)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start taking batches (before or after the app starts)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="batch-intake")

    async def stop(self) -> None:
        """Stop taking batches; a batch being handled is abandoned, unacknowledged (it is
        read again). Call it before the app stops, so that Faust commits the acks."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def forget(self, tps: Iterable[TP]) -> None:
        """Drop the buffered messages of partitions ``tps`` (revoked ones)."""
        dropped = self.buffer.forget(set(tps))
        if dropped:
            log.debug("dropped %d buffered messages of revoked partitions", dropped)

    def ack(self, messages: Iterable[Message]) -> None:
        """Acknowledge ``messages``: Faust may then commit their offsets."""
        consumer = self.app.consumer
        message_out = self.app.sensors.on_message_out
        for message in messages:
            if message.ack(consumer):
                message_out(message.tp, message.offset, message)

    async def _run(self) -> None:
        take, handler = self.buffer.take, self.handler
        try:
            while True:
                messages = await take(self.max_records)
                if messages:
                    done = await handler(messages)
                    self.ack(messages if done is None else done)
        except Exception as exc:  # a fault: the batch stays unacknowledged
            log.error("batch intake stopped: the handler raised %r", exc)
            self.failure = exc
            if self.on_error is not None:
                self.on_error(exc)

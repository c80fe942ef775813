"""Fan-out of live messages to subscribers, with a per-sensor replay buffer.

Overflow policy: each subscriber has a bounded queue. When a message does not fit, the
subscriber is marked overflowed; its connection sends ``error`` with code
``slow_consumer`` and closes with 1013 (try again later). The client reconnects with
``since_seq`` and resumes without a gap. Other subscribers are never slowed.

Routing is indexed: per sensor id, the subscribers it reaches are computed once (patterns
and scope) and kept until a subscription changes. A message is encoded once (the bytes
from Kafka) and the same bytes go to every subscriber. A subscriber whose connection can
take a message now hands it to its ``sink`` without a queue hop or a task wake-up; the
queue holds only what the connection cannot take yet.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from fnmatch import fnmatchcase

from forecast import metrics
from gateway.auth import Principal

Sink = Callable[[bytes], bool]  # takes a payload now (True) or refuses it (False)


class Subscriber:
    """One connection's subscriptions and its bounded outgoing queue."""

    def __init__(self, principal: Principal, queue_size: int) -> None:
        self.principal = principal
        self.patterns: set[str] = set()
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(queue_size)
        self.last_seq: dict[str, int] = {}
        self.overflowed = asyncio.Event()
        self.sink: Sink | None = None  # the connection's direct writer, if any
        self.sending = False  # the sender holds a queued payload not yet written
        self._matches: dict[str, bool] = {}

    def matches(self, sensor_id: str) -> bool:
        hit = self._matches.get(sensor_id)
        if hit is None:
            hit = self.principal.sees(sensor_id) and any(
                fnmatchcase(sensor_id, p) for p in self.patterns
            )
            self._matches[sensor_id] = hit
        return hit

    def set_patterns(self, patterns: set[str]) -> None:
        self.patterns = patterns
        self._matches.clear()

    def offer(self, sensor_id: str, seq: int, payload: bytes) -> bool:
        """Queue a prediction unless already delivered (by seq); False on overflow."""
        if seq <= self.last_seq.get(sensor_id, 0):
            return True
        return self.push(payload, sensor_id, seq)

    def push(self, payload: bytes, sensor_id: str | None = None, seq: int = 0) -> bool:
        """Deliver in order: straight to the sink when nothing waits before it, else
        through the bounded queue; False (and marked overflowed) when that is full."""
        if self.overflowed.is_set():
            return False
        if not self._direct(payload):
            try:
                self.queue.put_nowait(payload)
            except asyncio.QueueFull:
                self.overflowed.set()
                metrics.WS_DROPPED.inc()
                return False
        if sensor_id is not None:
            self.last_seq[sensor_id] = seq
        return True

    def _direct(self, payload: bytes) -> bool:
        sink = self.sink
        return sink is not None and not self.sending and self.queue.empty() and sink(payload)


Route = dict[Subscriber, None]  # an ordered set


class Hub:
    """Routes each prediction to the subscribers whose patterns (and scope) match."""

    def __init__(self, buffer_size: int = 1000) -> None:
        self.buffer_size = buffer_size
        self.subscribers: set[Subscriber] = set()
        self.recent: dict[str, deque[tuple[int, bytes]]] = {}
        self.latest: dict[str, dict] = {}
        self._routes: dict[str, Route] = {}

    def publish_prediction(self, message: dict, payload: bytes) -> None:
        sensor_id, seq = message["sensor_id"], message["seq"]
        buffer = self.recent.get(sensor_id)
        if buffer is None:
            buffer = self.recent[sensor_id] = deque(maxlen=self.buffer_size or None)
        if buffer and seq <= buffer[-1][0]:
            return  # a re-delivered prediction: already routed
        buffer.append((seq, payload))
        self.latest[sensor_id] = message
        for subscriber in self._route(sensor_id):
            subscriber.offer(sensor_id, seq, payload)

    def publish_event(self, sensor_id: str, payload: bytes) -> None:
        for subscriber in self._route(sensor_id):
            subscriber.push(payload)

    def subscribe(
        self, subscriber: Subscriber, patterns: set[str], since_seq: dict[str, int]
    ) -> int:
        """Add patterns and queue what the subscriber missed since ``since_seq``.

        Runs without awaiting, so no live message can slip between replay and live.
        Returns how many buffered predictions were queued.
        """
        subscriber.set_patterns(subscriber.patterns | patterns)
        self.subscribers.add(subscriber)
        self._reroute(subscriber)
        replayed = 0
        for sensor_id, seq in since_seq.items():
            if not subscriber.matches(sensor_id):
                continue
            subscriber.last_seq[sensor_id] = max(subscriber.last_seq.get(sensor_id, 0), seq)
            for buffered_seq, payload in self.recent.get(sensor_id, ()):
                if buffered_seq > seq and subscriber.offer(sensor_id, buffered_seq, payload):
                    replayed += 1
        return replayed

    def gaps(
        self, subscriber: Subscriber, patterns: set[str], since_seq: dict[str, int]
    ) -> dict[str, tuple[int, int | None]]:
        """Per sensor, the seq range after ``since_seq`` that memory no longer holds:
        (after, before) where ``before`` is the oldest seq kept (None: nothing kept)."""
        probe = Subscriber(subscriber.principal, 1)
        probe.set_patterns(subscriber.patterns | patterns)
        out = {}
        for sensor_id, seq in since_seq.items():
            if not probe.matches(sensor_id):
                continue
            buffer = self.recent.get(sensor_id)
            if not buffer:
                out[sensor_id] = (seq, None)
            elif buffer[0][0] > seq + 1:
                out[sensor_id] = (seq, buffer[0][0])
        return out

    def unsubscribe(self, subscriber: Subscriber, patterns: set[str]) -> None:
        subscriber.set_patterns(subscriber.patterns - patterns)
        if subscriber in self.subscribers:
            self._reroute(subscriber)

    def remove(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
        for route in self._routes.values():
            route.pop(subscriber, None)

    def _route(self, sensor_id: str) -> Route:
        """The subscribers a sensor's messages reach, computed on its first message."""
        route = self._routes.get(sensor_id)
        if route is None:
            route = {s: None for s in self.subscribers if s.matches(sensor_id)}
            self._routes[sensor_id] = route
        return route

    def _reroute(self, subscriber: Subscriber) -> None:
        """Bring the known routes up to date with the subscriber's current patterns."""
        for sensor_id, route in self._routes.items():
            if subscriber.matches(sensor_id):
                route[subscriber] = None
            else:
                route.pop(subscriber, None)

"""Fan-out of live messages to subscribers, with a per-sensor replay buffer.

Overflow policy: each subscriber has a bounded queue. When a message does not fit, the
subscriber is marked overflowed; its connection sends ``error`` with code
``slow_consumer`` and closes with 1013 (try again later). The client reconnects with
``since_seq`` and resumes without a gap. Other subscribers are never slowed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from fnmatch import fnmatchcase

from forecast import metrics
from gateway.auth import Principal


class Subscriber:
    """One connection's subscriptions and its bounded outgoing queue."""

    def __init__(self, principal: Principal, queue_size: int) -> None:
        self.principal = principal
        self.patterns: set[str] = set()
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(queue_size)
        self.last_seq: dict[str, int] = {}
        self.overflowed = asyncio.Event()
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
        if self.overflowed.is_set():
            return False
        try:
            self.queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.overflowed.set()
            metrics.WS_DROPPED.inc()
            return False
        if sensor_id is not None:
            self.last_seq[sensor_id] = seq
        return True


class Hub:
    """Routes each prediction to the subscribers whose patterns (and scope) match."""

    def __init__(self, buffer_size: int = 1000) -> None:
        self.buffer_size = buffer_size
        self.subscribers: set[Subscriber] = set()
        self.recent: dict[str, deque[tuple[int, bytes]]] = {}
        self.latest: dict[str, dict] = {}

    def publish_prediction(self, message: dict, payload: bytes) -> None:
        sensor_id, seq = message["sensor_id"], message["seq"]
        buffer = self.recent.get(sensor_id)
        if buffer is None:
            buffer = self.recent[sensor_id] = deque(maxlen=self.buffer_size or None)
        if buffer and seq <= buffer[-1][0]:
            return  # a re-delivered prediction: already routed
        buffer.append((seq, payload))
        self.latest[sensor_id] = message
        for subscriber in self.subscribers:
            if subscriber.matches(sensor_id):
                subscriber.offer(sensor_id, seq, payload)

    def publish_event(self, sensor_id: str, payload: bytes) -> None:
        for subscriber in self.subscribers:
            if subscriber.matches(sensor_id):
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

    def remove(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

"""The websocket stream: ``ws://host:8765/v1/stream`` (protocol in the README).

Client messages: ``subscribe`` (glob patterns, optional ``since_seq``), ``unsubscribe``,
``ping``. Server messages: ``subscribed``, ``unsubscribed``, ``prediction``, ``drift``,
``error`` (``code``, ``message``), ``pong``. A malformed message gets an ``error`` and
the connection stays open; so does one that fails in handling (code ``bad_message``),
never a close with 1011. Only a short string or a 64-bit integer ``id`` is echoed.

Sending: permessage-deflate is not offered (compressing every frame for every subscriber
was the largest cost of a fan-out; clients simply get uncompressed frames). A payload is
framed once for all subscribers (``_frame``), and what a connection is given during one
event-loop turn goes out in one socket write (``Outbox``), one websocket frame per
message as before. Whatever the connection cannot take now (its write buffer is past the
high-water mark) waits in the subscriber's bounded queue and goes through websockets'
own ``send``, which waits for the buffer to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import struct
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import orjson
from prometheus_client import Counter
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from forecast import metrics
from forecast.errors import AuthError, ForecastError
from gateway.auth import Authenticator, Principal, bearer
from gateway.hub import Hub, Subscriber
from gateway.limits import Network, RateLimiter, client_address

log = logging.getLogger(__name__)

PATH = "/v1/stream"
MAX_FRAME = 64 * 1024
MAX_PATTERNS_PER_MESSAGE = 100
MAX_PATTERNS = 1000
CLOSE_SLOW = 1013
CLOSE_POLICY = 1008
EVICT_TIMEOUT = 5.0
MAX_ID = 128
SEND_BUFFER = 256 * 1024
OUTBOX_BYTES = 64 * 1024  # at most this much framed per connection and turn

History = Callable[[dict[str, tuple[int, int | None]]], list[tuple[str, int, bytes]]]


class StreamServer:
    """``async with StreamServer(hub, auth, host, port):`` serves until the block ends."""

    def __init__(
        self,
        hub: Hub,
        auth: Authenticator,
        host: str,
        port: int,
        queue_size: int = 1000,
        history: History | None = None,
        connect_rate: str = "60/minute",
        message_rate: str = "20/second",
        *,
        trusted_proxies: tuple[Network, ...] = (),
    ) -> None:
        self.hub = hub
        self.trusted_proxies = trusted_proxies
        self.history = history
        self.connects = RateLimiter(connect_rate)
        self.message_rate = message_rate
        self.auth = auth
        self.host = host
        self.requested_port = port
        self.queue_size = queue_size
        self.server: Server | None = None
        self._principals: dict[int, Principal] = {}
        self._flusher = Flusher()  # renewed at each start: it belongs to one event loop

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError("not started")
        return self.server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._flusher = Flusher()
        self.server = await serve(
            self._handle,
            self.host,
            self.requested_port,
            process_request=self._check_request,
            max_size=MAX_FRAME,
            open_timeout=10,
            compression=None,
            ping_interval=20,
            ping_timeout=20,
        )

    async def stop(self, code: int = 1001) -> None:
        """Stop accepting, close every connection with ``code``, wait for the handlers."""
        if self.server is not None:
            self.server.close(code=code)
            await self.server.wait_closed()

    async def __aenter__(self) -> StreamServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        # Bound what the kernel buffers for a client; past it, the per-connection queue
        # (and so the overflow policy) holds what a slow client has not read.
        sock = connection.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        peer = connection.remote_address[0] if connection.remote_address else "?"
        forwarded = request.headers.get_all("X-Forwarded-For")
        address = client_address(peer, forwarded, self.trusted_proxies)
        wait = self.connects.hit(address)
        if wait is not None:
            response = connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many connections\n")
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
        url = urlsplit(request.path)
        if url.path != PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, f"websocket endpoint is {PATH}\n")
        query = parse_qs(url.query)
        token = bearer(request.headers.get("Authorization"), query.get("token", [None])[0])
        try:
            self._principals[id(connection)] = self.auth.authenticate(token)
        except AuthError as exc:
            return connection.respond(HTTPStatus.UNAUTHORIZED, f"{exc.message}\n")
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        principal = self._principals.pop(id(connection))
        subscriber = Subscriber(principal, self.queue_size)
        outbox = Outbox(connection, self._flusher)
        subscriber.sink = outbox.take
        metrics.WS_CONNECTIONS.inc()
        sender = asyncio.create_task(self._send_loop(connection, subscriber, outbox))
        messages = RateLimiter(self.message_rate)
        try:
            async for frame in connection:
                if messages.hit("connection") is not None:
                    await self._close_abusive(connection, subscriber, outbox)
                    break
                reply = await self._reply(subscriber, frame)
                if reply is not None and not subscriber.push(reply):
                    break
        except ConnectionClosed:
            pass
        finally:
            self.hub.remove(subscriber)
            subscriber.sink = None
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            metrics.WS_CONNECTIONS.dec()

    async def _close_abusive(
        self, connection: ServerConnection, subscriber: Subscriber, outbox: Outbox
    ) -> None:
        """Past the message rate: an error after what is queued, then close 1008."""
        self.hub.remove(subscriber)
        limited = _error("rate_limited", f"more than {self.message_rate} messages")
        subscriber.push(orjson.dumps(limited))
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            async with asyncio.timeout(EVICT_TIMEOUT):
                await subscriber.queue.join()  # the sender delivers what is queued
                outbox.flush()
                await connection.close(CLOSE_POLICY, "rate limited")

    async def _send_loop(
        self, connection: ServerConnection, subscriber: Subscriber, outbox: Outbox
    ) -> None:
        sending = asyncio.create_task(self._drain(connection, subscriber, outbox))
        overflow = asyncio.create_task(subscriber.overflowed.wait())
        try:
            await asyncio.wait({sending, overflow}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sending.cancel()
            overflow.cancel()
        if subscriber.overflowed.is_set():
            await self._evict(connection, outbox)

    async def _drain(
        self, connection: ServerConnection, subscriber: Subscriber, outbox: Outbox
    ) -> None:
        """Send what waits in the queue, in order, once the connection can take it."""
        with contextlib.suppress(ConnectionClosed):
            while True:
                payload = await subscriber.queue.get()
                subscriber.sending = True  # nothing may overtake this payload
                if not outbox.take(payload):
                    outbox.flush()
                    await connection.send(payload, text=True)  # waits for the buffer
                    _frame(payload)[1].inc()
                subscriber.sending = False
                subscriber.queue.task_done()

    async def _evict(self, connection: ServerConnection, outbox: Outbox) -> None:
        """Tell a subscriber its queue overflowed and close with 1013; a client that does
        not even read that is cut off after EVICT_TIMEOUT seconds."""
        overflowed = _error("slow_consumer", "queue overflowed; reconnect with since_seq")
        outbox.flush()
        try:
            async with asyncio.timeout(EVICT_TIMEOUT):
                await connection.send(orjson.dumps(overflowed), text=True)
                await connection.close(CLOSE_SLOW, "slow consumer")
        except (TimeoutError, ConnectionClosed):
            connection.transport.abort()

    async def _reply(self, subscriber: Subscriber, frame: str | bytes) -> bytes | None:
        """The encoded reply to one client message; an ``error`` frame if handling or
        encoding fails (the connection stays open)."""
        try:
            reply = await self._on_message(subscriber, frame)
            return None if reply is None else orjson.dumps(reply)
        except Exception:  # a bug or an input nobody foresaw: log it, keep the connection
            log.exception("a websocket message could not be handled")
            return orjson.dumps(_error("bad_message", "message could not be handled"))

    async def _on_message(self, subscriber: Subscriber, frame: str | bytes) -> dict | None:
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return _error("bad_json", "message is not JSON")
        if not isinstance(message, dict):
            return _error("bad_request", "message must be a JSON object")
        op = message.get("op")
        if op == "ping":
            ping_id = message.get("id")
            if ping_id is not None and not _echoable(ping_id):
                return _error(
                    "bad_request",
                    f"id must be a string of at most {MAX_ID} characters or a 64-bit integer",
                )
            return {"type": "pong", "id": ping_id}
        if op not in ("subscribe", "unsubscribe"):
            short = op is None or (isinstance(op, str) and len(op) <= MAX_ID)
            shown = repr(op) if short else "(not a short string)"
            return _error("unknown_op", f"unknown op {shown}; use subscribe, unsubscribe or ping")
        patterns = message.get("sensors")
        if (
            not isinstance(patterns, list)
            or not patterns
            or not all(isinstance(p, str) and 0 < len(p) <= 200 for p in patterns)
        ):
            return _error("bad_request", "sensors must be a non-empty list of patterns")
        if len(patterns) > MAX_PATTERNS_PER_MESSAGE:
            return _error("too_many_patterns", f"at most {MAX_PATTERNS_PER_MESSAGE} a message")
        if op == "unsubscribe":
            self.hub.unsubscribe(subscriber, set(patterns))
            return {"type": "unsubscribed", "sensors": patterns}
        if len(subscriber.patterns | set(patterns)) > MAX_PATTERNS:
            return _error("too_many_patterns", f"at most {MAX_PATTERNS} per connection")
        since = message.get("since_seq") or {}
        if not isinstance(since, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in since.items()
        ):
            return _error("bad_request", "since_seq must map sensor ids to integers >= 0")
        await self._subscribe(subscriber, set(patterns), since)
        return None

    async def _subscribe(
        self, subscriber: Subscriber, patterns: set[str], since: dict[str, int]
    ) -> None:
        """Acknowledge, then what was missed (store, then memory), then live: in order,
        with no gap and no duplicate (delivery is by per-sensor seq)."""
        missed: list[tuple[str, int, bytes]] = []
        gaps = self.hub.gaps(subscriber, patterns, since)
        if gaps and self.history is not None:
            try:
                missed = await asyncio.to_thread(self.history, gaps)
            except ForecastError as exc:
                log.warning("resume from the store failed: %s", exc)
                subscriber.push(orjson.dumps(_error("resume_incomplete", exc.message)))
        ack = {"type": "subscribed", "sensors": sorted(subscriber.patterns | patterns)}
        if not subscriber.push(orjson.dumps(ack)):
            return
        for sensor_id, seq in since.items():
            subscriber.last_seq.setdefault(sensor_id, seq)
        for sensor_id, seq, payload in missed:
            subscriber.offer(sensor_id, seq, payload)
        self.hub.subscribe(subscriber, patterns, since)


def _echoable(value: object) -> bool:
    """Whether a ping ``id`` may be echoed: a short string or a 64-bit integer."""
    if isinstance(value, str):
        return len(value) <= MAX_ID
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**64


def _error(code: str, message: str) -> dict:
    return {"type": "error", "code": code, "message": message}


def _kind(payload: bytes) -> str:
    head = payload[:20]
    for kind in ("prediction", "drift", "error", "subscribed", "pong"):
        if kind.encode() in head:
            return kind
    return "other"


@functools.lru_cache(maxsize=1024)
def _frame(payload: bytes) -> tuple[bytes, Counter]:
    """A server text frame of ``payload`` (RFC 6455, unmasked, no extension) and the
    counter it counts in: built once per distinct payload, shared by all subscribers."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload, metrics.WS_MESSAGES.labels(_kind(payload))


class Flusher:
    """Once per event-loop turn, writes what each outbox was given during that turn (and
    counts the frames, one counter update per kind and turn)."""

    def __init__(self) -> None:
        self._dirty: list[Outbox] = []
        self._counts: dict[Counter, int] = {}

    def mark(self, outbox: Outbox) -> None:
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self._flush)
        self._dirty.append(outbox)

    def count(self, counter: Counter) -> None:
        self._counts[counter] = self._counts.get(counter, 0) + 1

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        counts, self._counts = self._counts, {}
        for outbox in dirty:
            try:
                outbox.flush()
            except Exception:  # never silently lose frames: that connection resumes instead
                log.exception("a websocket write failed; closing that connection")
                outbox.transport.abort()
        for counter, n in counts.items():
            counter.inc(n)


class Outbox:
    """A connection's direct path: takes frames while its write buffer is below the
    high-water mark and no other send is in progress; one socket write per turn."""

    def __init__(self, connection: ServerConnection, flusher: Flusher) -> None:
        self.connection = connection
        self.protocol = connection.protocol
        self.transport = connection.transport
        self.flusher = flusher
        self.pending: list[bytes] = []
        self.size = 0
        self.plain = not connection.protocol.extensions  # frames need no per-connection step

    def take(self, payload: bytes) -> bool:
        """Accept ``payload`` for this turn's write; False if it must wait in the queue."""
        connection = self.connection
        if (
            self.size >= OUTBOX_BYTES
            or connection.paused
            or connection.send_in_progress is not None
            or not self.plain
            or not self._open()
        ):
            return False
        frame, sent = _frame(payload)
        if not self.pending:
            self.flusher.mark(self)
        self.pending.append(frame)
        self.size += len(frame)
        self.flusher.count(sent)
        return True

    def flush(self) -> None:
        """Write the pending frames (dropped if the connection is no longer open)."""
        if not self.pending:
            return
        frames, self.pending, self.size = self.pending, [], 0
        if self._open():
            self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def _open(self) -> bool:
        return self.protocol.state is State.OPEN and not self.transport.is_closing()

"""Guards in front of the HTTP app: trusted proxies, a body cap, header and idle timeouts.

``TrustedProxies`` and ``BodyLimit`` are plain ASGI middleware; ``GuardedH11Protocol``
is uvicorn's h11 protocol with a deadline for the request head (uvicorn has a keep-alive
timeout but none for a connection that never finishes its headers) and a cap on
connections that is enforced when a connection opens, not only when a request arrives.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import h11
import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.limits import Network, client_address, is_trusted

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyTooLarge(Exception):
    """The request body went past the cap while it was being read."""


class BodyTimeout(Exception):
    """The request body did not arrive within the time allowed."""


async def send_error(send: Any, status: int, code: str, message: str) -> None:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class TrustedProxies:
    """Sets the ASGI ``client`` (and ``scheme``) from ``X-Forwarded-For`` (and
    ``X-Forwarded-Proto``) only when the peer is a trusted proxy; otherwise the headers
    are ignored and the peer is the client."""

    def __init__(self, app: Any, trusted: tuple[Network, ...]) -> None:
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        client = scope.get("client") if scope["type"] in ("http", "websocket") else None
        if client and is_trusted(client[0], self.trusted):
            forwarded = [
                v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"
            ]
            address = client_address(client[0], forwarded, self.trusted)
            scope = {**scope, "client": (address, 0)}
            proto = [v.strip() for k, v in scope["headers"] if k == b"x-forwarded-proto"]
            if proto and proto[-1] in (b"http", b"https"):
                scope["scheme"] = proto[-1].decode()
        await self.app(scope, receive, send)


class BodyLimit:
    """413 ``body_too_large`` when ``Content-Length`` exceeds ``max_bytes`` (nothing is
    read) or when a chunked body streams past it (reading stops there); 408
    ``body_timeout`` when the whole body takes longer than ``timeout`` seconds."""

    def __init__(self, app: Any, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body over {self.max_bytes} bytes"
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                await send_error(send, 413, "body_too_large", too_large)
                return
        received = 0
        complete = False
        deadline = time.monotonic() + self.timeout
        started = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
                complete = not message.get("more_body", False)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except (BodyTooLarge, BodyTimeout) as exc:
            if started:
                raise
            if isinstance(exc, BodyTooLarge):
                await send_error(send, 413, "body_too_large", too_large)
            else:
                message = f"request body not received within {self.timeout:g} s"
                await send_error(send, 408, "body_timeout", message)


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic`` deadline on the running loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection must complete each request head within
    ``header_timeout`` seconds (of connecting, or of its first byte after a keep-alive
    pause; the same for a body the server no longer reads) or it is closed (with a 408
    when part of a request arrived); past ``max_connections`` open connections a new one
    is answered 503 and closed at once."""

    header_timeout: float = 10.0
    max_connections: int | None = None

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            transport.write(_raw_response(503, "too many connections"))
            transport.close()
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self._client_owes_data():
            self._arm_head_timer()  # the first byte of a request after a keep-alive pause
        super().data_received(data)
        if not self._client_owes_data():
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY or self.conn.trailing_data[0]:
            self._arm_head_timer()  # an unread body, or part of a pipelined request

    def _client_owes_data(self) -> bool:
        """Waiting for a request head, or for the end of a body nobody reads any more."""
        their, ours = self.conn.their_state, self.conn.our_state
        return their is h11.IDLE or (their is h11.SEND_BODY and ours is h11.DONE)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._client_owes_data():
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self.transport.write(_raw_response(408, "request headers not received in time"))
        self.transport.close()


def _raw_response(status: int, message: str) -> bytes:
    """A complete response written straight to the socket (no request cycle exists)."""
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    code = {408: "header_timeout", 503: "too_many_connections"}[status]
    body = orjson.dumps({"error": {"code": code, "message": message}})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(header_timeout: float, max_connections: int | None) -> type[H11Protocol]:
    """A ``GuardedH11Protocol`` class with these limits, for ``uvicorn.Config(http=...)``."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )

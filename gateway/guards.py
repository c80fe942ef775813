"""Guards in front of the HTTP app: request ids, rate limits and security headers;
trusted proxies; a body cap; header and idle timeouts.

``RequestGuard``, ``TrustedProxies``, ``BodyLimit`` and ``HeadAsGet`` are plain ASGI
middleware;
``GuardedH11Protocol`` is uvicorn's h11 protocol with a deadline for the request head
(uvicorn has a keep-alive timeout but none for a connection that never finishes its
headers) and a cap on connections that is enforced when a connection opens, not only
when a request arrives.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
import uuid
from typing import Any

import h11
import orjson
from starlette.datastructures import Headers, MutableHeaders, QueryParams
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from forecast import logs
from gateway.auth import bearer
from gateway.limits import Network, RateLimiter, client_address, is_trusted

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; "
        "script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'"
    ),
}
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class BodyRefused(HTTPException):
    """The request body went past the cap (413) or did not arrive in time (408). Raised
    while the app reads the body, so the app's handler for HTTPException answers it
    (with ``code``); ``BodyLimit`` answers if it gets here unanswered."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, message, headers={"Connection": "close"})
        self.code = code


async def send_error(send: Any, status: int, code: str, message: str) -> None:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Every request gets an ``X-Request-ID`` (the caller's if well formed, else a new
    one; bound to the logs while it runs) and the security headers; ``/v1/`` requests
    are rate limited per address and per key (429 ``rate_limited`` with ``Retry-After``)
    and logged with their status and duration."""

    def __init__(self, app: Any, rate: str) -> None:
        self.app = app
        self.limiter = RateLimiter(rate)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id", "")
        if not REQUEST_ID.match(request_id):
            request_id = uuid.uuid4().hex
        status = 0

        async def guarded_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                out = MutableHeaders(scope=message)
                out["X-Request-ID"] = request_id
                for name, value in SECURITY_HEADERS.items():
                    out.setdefault(name, value)
            await send(message)

        path = scope["path"]
        versioned = path.startswith("/v1/")
        wait = self._wait(scope, headers) if versioned else None
        started = time.perf_counter()
        bound = logs.REQUEST_ID.set(request_id)
        try:
            if wait is None:
                await self.app(scope, receive, guarded_send)
            else:
                refused = JSONResponse(
                    {
                        "error": {
                            "code": "rate_limited",
                            "message": "too many requests; see Retry-After",
                        }
                    },
                    429,
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
                await refused(scope, receive, guarded_send)
            if versioned:
                took = (time.perf_counter() - started) * 1000
                log.info("%s %s %d %.1f ms", scope["method"], path, status, took)
        finally:
            logs.REQUEST_ID.reset(bound)

    def _wait(self, scope: Scope, headers: Headers) -> float | None:
        """Seconds until the caller may ask again (its address or key), or None."""
        token = bearer(
            headers.get("authorization"), QueryParams(scope["query_string"]).get("token")
        )
        client = scope.get("client")
        callers = [f"addr:{client[0] if client else '?'}"]
        if token:
            callers.append("key:" + hashlib.sha256(token.encode()).hexdigest()[:24])
        waits = [w for c in callers if (w := self.limiter.hit(c)) is not None]
        return max(waits) if waits else None


class HeadAsGet:
    """HEAD is answered as GET (the server sends no body), as Starlette's routes do;
    FastAPI's routes answer only the methods they declare."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


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
                late = f"request body not received within {self.timeout:g} s"
                raise BodyRefused(408, "body_timeout", late) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyRefused(413, "body_too_large", too_large)
                complete = not message.get("more_body", False)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyRefused as exc:
            if started:
                raise
            await send_error(send, exc.status_code, exc.code, exc.detail)


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

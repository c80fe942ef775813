"""The HTTP API (Starlette): health, metrics, the dashboard, and ``/v1/`` behind credentials."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib import resources
from typing import TypeVar

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from forecast import logs, metrics
from forecast.errors import AuthError, ForecastError, ModelError, QueryError, StoreError
from forecast.schemas import iso
from gateway.auth import Authenticator, Principal, bearer
from gateway.guards import BodyLimit, TrustedProxies, guarded_protocol
from gateway.history import forecast_history
from gateway.hub import Hub
from gateway.limits import Network, RateLimiter
from gateway.openapi import spec
from models.registry import Registry
from sinks.clickhouse import Store
from sinks.export import MEDIA_TYPES, ExportRequest, export
from sinks.query import Access, QueryLimits, run_readonly
from streams.validate import Invalid, parse_time

log = logging.getLogger(__name__)

MAX_QUERY_ROWS = 10_000
T = TypeVar("T")


@dataclass
class ApiContext:
    auth: Authenticator
    hub: Hub | None = None
    store: Store | None = None
    registry: Registry | None = None
    checks: dict[str, Callable[[], Awaitable[bool]]] = field(default_factory=dict)
    limits: QueryLimits = field(default_factory=QueryLimits)
    export_max_rows: int = 2_000_000
    export_timeout: float = 300.0


def error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


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


def create_app(
    ctx: ApiContext,
    rate: str = "60/minute,1000/hour",
    cors_origins: str = "",
    *,
    max_body: int = 1 << 20,
    body_timeout: float = 30.0,
    trusted_proxies: tuple[Network, ...] = (),
) -> Starlette:
    def principal(request: Request, role: str = "viewer") -> Principal:
        token = bearer(request.headers.get("authorization"), request.query_params.get("token"))
        who = ctx.auth.authenticate(token)
        if not who.can(role):
            raise AuthError(f"the {who.role} role may not do this; needs {role}", code="forbidden")
        return who

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        results = {name: await check() for name, check in ctx.checks.items()}
        ready = all(results.values())
        return JSONResponse({"ready": ready, "checks": results}, 200 if ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def dashboard(request: Request) -> Response:
        html = resources.files("gateway").joinpath("static/index.html").read_text()
        return HTMLResponse(html)

    async def sensors(request: Request) -> Response:
        who = principal(request)
        hub = _need(ctx.hub, "the live feed")
        rows = [
            {"sensor_id": s, "seq": m["seq"], "ts": m["ts"], "model": m["model"]}
            for s, m in sorted(hub.latest.items())
            if who.sees(s)
        ]
        return JSONResponse({"sensors": rows})

    async def latest(request: Request) -> Response:
        who = principal(request)
        sensor_id = request.path_params["sensor_id"]
        message = _need(ctx.hub, "the live feed").latest.get(sensor_id)
        if message is None or not who.sees(sensor_id):
            return error(404, "not_found", f"no forecast for sensor {sensor_id!r} yet")
        return JSONResponse(message)

    async def query(request: Request) -> Response:
        who = principal(request, "analyst")
        store = _need(ctx.store, "the store")
        try:
            body = await request.json()
        except ValueError:
            return error(400, "bad_request", 'body must be JSON: {"sql": "SELECT ..."}')
        if not isinstance(body, dict) or not isinstance(body.get("sql"), str):
            return error(400, "bad_request", 'body must be JSON: {"sql": "SELECT ..."}')
        cap = ctx.limits.max_rows
        max_rows = body.get("max_rows", cap)
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or not 0 < max_rows <= cap:
            return error(400, "bad_request", f"max_rows must be 1..{cap}")
        limits = replace(ctx.limits, max_rows=max_rows)
        result = await asyncio.to_thread(
            run_readonly, store, body["sql"], limits, Access(who.scopes)
        )
        return Response(orjson.dumps(result.to_json(), default=str), media_type="application/json")

    async def export_endpoint(request: Request) -> Response:
        who = principal(request, "analyst")
        store = _need(ctx.store, "the store")
        params = request.query_params
        try:
            wanted = ExportRequest(
                what=params.get("what", "predictions"),
                sensors=params.get("sensors", "*"),
                start=_time(params.get("from")),
                stop=_time(params.get("to")),
                fmt=params.get("format", "csv"),
            )
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        chunks = await asyncio.to_thread(
            export, store, wanted, Access(who.scopes), ctx.export_max_rows, ctx.export_timeout
        )
        return StreamingResponse(iterate_in_threadpool(chunks), media_type=MEDIA_TYPES[wanted.fmt])

    async def history(request: Request) -> Response:
        who = principal(request)
        sensor_id = request.path_params["sensor_id"]
        if not who.sees(sensor_id):
            return error(404, "not_found", f"no forecasts for sensor {sensor_id!r}")
        store = _need(ctx.store, "the store")
        try:
            start, stop = (
                _time(request.query_params.get("from")),
                _time(request.query_params.get("to")),
            )
            limit = int(request.query_params.get("limit", "1000"))
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        if not 0 < limit <= 10_000:
            return error(400, "bad_request", "limit must be 1..10000")
        found = await asyncio.to_thread(forecast_history, store, sensor_id, start, stop, limit)
        return Response(
            orjson.dumps({"sensor_id": sensor_id, "forecasts": found}),
            media_type="application/json",
        )

    async def models(request: Request) -> Response:
        principal(request)
        registry = _need(ctx.registry, "the model registry")
        return JSONResponse({"models": await asyncio.to_thread(registry.versions)})

    async def promote(request: Request) -> Response:
        principal(request, "operator")
        registry = _need(ctx.registry, "the model registry")
        stage = request.query_params.get("stage", "production")
        name = request.path_params["name"]
        try:
            version = int(request.path_params["version"])
        except ValueError:
            return error(400, "bad_request", "version must be an integer")
        await asyncio.to_thread(registry.promote, name, version, stage)
        return JSONResponse({"name": name, "version": version, "stage": stage})

    async def importances(request: Request) -> Response:
        principal(request)
        registry = _need(ctx.registry, "the model registry")
        name = request.path_params["name"]
        try:
            version = int(request.path_params["version"])
        except ValueError:
            return error(400, "bad_request", "version must be an integer")
        meta = await asyncio.to_thread(registry.meta, name, version)
        if "importances" not in meta:
            return error(404, "no_importances", f"{name} v{version} ({meta['kind']}) has none")
        return JSONResponse({"name": name, "version": version, **meta["importances"]})

    async def decisions(request: Request) -> Response:
        principal(request)
        store = _need(ctx.store, "the store")
        try:
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            return error(400, "bad_request", "limit must be an integer")
        if not 0 < limit <= 10_000:
            return error(400, "bad_request", "limit must be 1..10000")
        rows = await asyncio.to_thread(
            store.query,
            "SELECT at, action, model, model_version, detail FROM forecast.model_decisions "
            "ORDER BY at DESC LIMIT {limit:UInt32}",
            {"limit": limit},
        )
        found = [
            {
                "at": iso(at.timestamp()),
                "action": action,
                "model": model,
                "model_version": version,
                "detail": orjson.loads(detail),
            }
            for at, action, model, version, detail in rows
        ]
        return JSONResponse({"decisions": found})

    async def rollback(request: Request) -> Response:
        principal(request, "operator")
        registry = _need(ctx.registry, "the model registry")
        stage = request.query_params.get("stage", "production")
        ref = await asyncio.to_thread(registry.rollback, stage)
        return JSONResponse({"name": ref.name, "version": ref.version, "stage": stage})

    async def keys(request: Request) -> Response:
        principal(request, "admin")
        if request.method == "GET":
            listed = await asyncio.to_thread(ctx.auth.keys.list)
            return JSONResponse({"keys": [asdict(k) for k in listed]})
        try:
            body = await request.json()
        except ValueError:
            return error(400, "bad_request", "body must be JSON")
        if not isinstance(body, dict):
            return error(400, "bad_request", "body must be a JSON object")
        scopes = body.get("scopes", ["*"])
        name = body.get("name", "")
        if (
            not isinstance(scopes, list)
            or not all(isinstance(x, str) and x for x in scopes)
            or not isinstance(name, str)
        ):
            return error(400, "bad_request", "scopes must be a list of patterns, name a string")
        key_id, token = await asyncio.to_thread(
            ctx.auth.keys.create, body.get("role"), name, scopes
        )
        return JSONResponse(
            {"key_id": key_id, "token": token, "note": "the token is shown only now"}
        )

    async def revoke(request: Request) -> Response:
        principal(request, "admin")
        key_id = request.path_params["key_id"]
        if not await asyncio.to_thread(ctx.auth.keys.revoke, key_id):
            return error(404, "not_found", f"no active key {key_id!r}")
        return JSONResponse({"key_id": key_id, "revoked": True})

    async def openapi(request: Request) -> Response:
        return JSONResponse(spec())

    async def on_forecast_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ForecastError)
        if isinstance(exc, AuthError):
            status = {"forbidden": 403, "bad_request": 400, "bad_scope": 400}.get(exc.code, 401)
            return error(status, exc.code, exc.message)
        if isinstance(exc, ModelError):
            status = 404 if exc.message.startswith("no model") else 409
            if exc.message.startswith("unknown stage"):
                status = 400
            return error(status, exc.code, exc.message)
        if isinstance(exc, QueryError):
            return error(400, exc.code, exc.message)
        if isinstance(exc, StoreError):
            return error(503, exc.code, exc.message, {"Retry-After": "5"})
        return error(500, exc.code, exc.message)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, "http_error", str(exc.detail))

    limiter = RateLimiter(rate)

    async def guard(request: Request, call_next: Callable) -> Response:
        """Request id, rate limit on /v1/ (per key and per address), security headers."""
        request_id = request.headers.get("x-request-id", "")
        if not REQUEST_ID.match(request_id):
            request_id = uuid.uuid4().hex
        response = None
        if request.url.path.startswith("/v1/"):
            token = bearer(request.headers.get("authorization"), request.query_params.get("token"))
            callers = [f"addr:{request.client.host if request.client else '?'}"]
            if token:
                callers.append("key:" + hashlib.sha256(token.encode()).hexdigest()[:24])
            waits = [w for c in callers if (w := limiter.hit(c)) is not None]
            if waits:
                retry = str(max(1, math.ceil(max(waits))))
                response = error(
                    429,
                    "rate_limited",
                    "too many requests; see Retry-After",
                    {"Retry-After": retry},
                )
        started = time.perf_counter()
        bound = logs.REQUEST_ID.set(request_id)
        try:
            if response is None:
                response = await call_next(request)
            if request.url.path.startswith("/v1/"):
                took = (time.perf_counter() - started) * 1000
                log.info(
                    "%s %s %d %.1f ms",
                    request.method,
                    request.url.path,
                    response.status_code,
                    took,
                )
        finally:
            logs.REQUEST_ID.reset(bound)
        response.headers["X-Request-ID"] = request_id
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    middleware = [
        Middleware(TrustedProxies, trusted=trusted_proxies),
        Middleware(BaseHTTPMiddleware, dispatch=guard),
        Middleware(BodyLimit, max_bytes=max_body, timeout=body_timeout),
        Middleware(GZipMiddleware, minimum_size=1024),
    ]
    origins = [o.strip() for o in cors_origins.split(",") if o.strip()]
    if origins:
        middleware.insert(
            1,
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                expose_headers=["X-Request-ID", "Retry-After"],
            ),
        )
    return Starlette(
        middleware=middleware,
        routes=[
            Route("/", dashboard),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
            Route("/v1/sensors", sensors),
            Route("/v1/sensors/{sensor_id}/forecast", latest),
            Route("/v1/query", query, methods=["POST"]),
            Route("/v1/export", export_endpoint),
            Route("/v1/sensors/{sensor_id}/forecasts", history),
            Route("/v1/models", models),
            Route("/v1/models/rollback", rollback, methods=["POST"]),
            Route("/v1/models/{name}/{version}/promote", promote, methods=["POST"]),
            Route("/v1/models/{name}/{version}/importances", importances),
            Route("/v1/decisions", decisions),
            Route("/v1/keys", keys, methods=["GET", "POST"]),
            Route("/v1/keys/{key_id}", revoke, methods=["DELETE"]),
            Route("/openapi.json", openapi),
        ],
        exception_handlers={ForecastError: on_forecast_error, HTTPException: on_http_error},
    )


def _need(part: T | None, what: str) -> T:
    if part is None:
        raise StoreError(f"{what} is not served by this process")
    return part


def _time(text: str | None) -> datetime | None:
    """An RFC 3339 time (UTC when it names no offset), or None."""
    if not text:
        return None
    try:
        return datetime.fromtimestamp(parse_time(text), UTC)
    except Invalid as exc:
        raise ValueError(f"bad time {text!r}: {exc.detail}") from None


class HttpServer:
    """uvicorn inside the caller's event loop (the caller handles signals).

    uvicorn's own ``X-Forwarded-For`` handling is off (it trusts 127.0.0.1 by default):
    the app's ``TrustedProxies`` decides. Request heads must arrive within
    ``header_timeout``, idle keep-alive connections close after ``keep_alive`` seconds,
    and at most ``max_connections`` are open at once (``backlog`` more wait in the kernel).
    """

    def __init__(
        self,
        app: Starlette,
        host: str,
        port: int,
        *,
        header_timeout: float = 10.0,
        keep_alive: float = 5.0,
        max_connections: int = 1000,
        backlog: int = 2048,
    ) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            http=guarded_protocol(header_timeout, max_connections),
            proxy_headers=False,
            timeout_keep_alive=keep_alive,  # type: ignore[arg-type]  # a float works
            backlog=backlog,
        )
        self.server = _QuietServer(config)
        self.host, self.requested_port = host, port
        self._task: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(), name="http")
        while not self.server.started:
            if self._task.done():
                with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind
                    self._task.result()
                raise ForecastError(f"cannot serve HTTP on {self.host}:{self.requested_port}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield

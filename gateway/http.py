"""The HTTP API: a FastAPI app of the routes in :mod:`gateway.api`, behind the guards,
and ``HttpServer``, uvicorn inside the caller's event loop.

``/healthz``, ``/readyz``, ``/metrics`` and the dashboard need no credentials; every
``/v1/`` route does. The OpenAPI document (``/openapi.json``) is generated from the
routes; errors are ``{"error": {"code", "message"}}`` (:mod:`gateway.api.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.staticfiles import StaticFiles

from forecast import __version__
from forecast.errors import ForecastError
from forecast.options import Network
from gateway.api import (
    analysts,
    audit,
    backup,
    console,
    forecasts,
    health,
    keys,
    registry,
    sensors,
    webhooks,
)
from gateway.api.context import ApiContext
from gateway.api.errors import GUARDED, HANDLERS, document, responses
from gateway.guards import BodyLimit, HeadAsGet, RequestGuard, TrustedProxies, guarded_protocol

__all__ = ["ApiContext", "HttpServer", "create_app"]

OFF = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


def create_app(
    ctx: ApiContext,
    rate: str = "60/minute,1000/hour",
    cors_origins: str = "",
    *,
    max_body: int = 1 << 20,
    body_timeout: float = 30.0,
    trusted_proxies: tuple[Network, ...] = (),
) -> FastAPI:
    """The app serving ``ctx``: ``rate`` per key and per address on ``/v1/`` (e.g.
    ``60/minute,1000/hour``), CORS for the comma-separated ``cors_origins``, request
    bodies of at most ``max_body`` bytes within ``body_timeout`` seconds, and
    ``X-Forwarded-For`` believed from ``trusted_proxies`` only."""
    middleware = [
        Middleware(TrustedProxies, trusted=trusted_proxies),
        Middleware(RequestGuard, rate=rate),
        Middleware(BodyLimit, max_bytes=max_body, timeout=body_timeout),
        Middleware(GZipMiddleware, minimum_size=1024),
        Middleware(HeadAsGet),
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
    app = FastAPI(
        title="forecast",
        version=__version__,
        description="Live forecasts, their history, models, keys and SQL.",
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
        middleware=middleware,
        exception_handlers=HANDLERS,  # type: ignore[arg-type]
        telemetry=OFF,  # type: ignore[arg-type]  # tracing is forecast.tracing's
        generate_unique_id_function=lambda route: route.name,  # operationId: the function
    )
    app.state.ctx = ctx
    app.include_router(health.router)
    # The console's own files, from the package: no listing, no way out of the folder.
    app.mount("/static", StaticFiles(packages=[("gateway", "static")]), name="static")
    v1 = APIRouter(prefix="/v1", responses=responses(*GUARDED))
    for area in (sensors, forecasts, analysts, registry, keys, webhooks, backup, audit, console):
        v1.include_router(area.router)
    app.include_router(v1)
    app.openapi = _documented(app)  # type: ignore[method-assign]
    return app


def _documented(app: FastAPI) -> Any:
    """FastAPI's ``openapi()`` with this API's 400 in place of FastAPI's 422."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(generate())
        return app.openapi_schema

    return openapi


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

"""Putting the parts together in one process: broker, store, worker, gateway, HTTP.

``forecast up`` runs all of them; ``forecast worker`` and ``forecast gateway`` run their
part. Parts start in dependency order and stop in reverse, on SIGINT or SIGTERM, or when
the worker fails (a fault, a stall, a broker that lost its data): then the process exits
non-zero with the reason, for its supervisor to restart it. From the signal or the fault,
the process ends within SHUTDOWN_DEADLINE seconds whatever hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import orjson
from aiokafka import AIOKafkaProducer

from forecast import tracing
from forecast.errors import ForecastError
from forecast.settings import Settings
from forecast.workers import WorkerPool
from gateway.auth import Authenticator, JwtVerifier, KeyStore
from gateway.feed import Feed
from gateway.forecasts import OnDemand
from gateway.history import missed
from gateway.http import ApiContext, HttpServer, create_app
from gateway.hub import Hub
from gateway.webhooks import Dispatcher
from gateway.ws import StreamServer
from models.registry import Registry
from models.serving import ModelWatcher, pick_device, share_cpus
from sinks import owner
from sinks.backup_schedule import run_schedule
from sinks.clickhouse import Store
from sinks.consumer import Sink
from sinks.query import QueryLimits
from sinks.webhooks import WebhookStore, decision_event, drift_event
from streams.alerts import CoverageAlerts, StallAlerts
from streams.broker import EmbeddedBroker, ensure_topics, wait_until_ready
from streams.retrain import DriftListener, Retrainer
from streams.worker import Worker

log = logging.getLogger(__name__)

Feeder = Callable[[AIOKafkaProducer, str], Awaitable[object]]
SHUTDOWN_DEADLINE = 9.0  # seconds from SIGTERM (or a worker fault) to the process's exit
TRIM_EVERY = 10.0  # seconds between returns of the C heap's free pages to the system


@dataclass
class Parts:
    """What one process runs. ``workers`` > 1: that many worker processes instead of one
    in-process worker, supervised by this one (``forecast up --workers N``)."""

    worker: bool = True
    sink: bool = True
    gateway: bool = True
    workers: int = 1


def key_store(settings: Settings) -> KeyStore:
    return KeyStore.of(settings.data_dir)


def authenticator(settings: Settings) -> Authenticator:
    """Who a websocket or HTTP client is: API keys, JWTs (or nobody checked, auth off)."""
    return Authenticator(
        key_store(settings), enabled=settings.auth, jwt_verifier=jwt_verifier(settings)
    )


def jwt_verifier(settings: Settings) -> JwtVerifier | None:
    rules = {
        "max_ttl": settings.jwt_max_ttl,
        "issuer": settings.jwt_issuer,
        "audience": settings.jwt_audience,
    }
    if settings.jwt_secret is not None:
        return JwtVerifier("HS256", settings.jwt_secret.get_secret_value(), **rules)
    if settings.jwt_public_key is not None:
        return JwtVerifier("RS256", settings.jwt_public_key, **rules)
    return None


async def run(
    settings: Settings,
    parts: Parts,
    *,
    feeder: Feeder | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Run the chosen parts until SIGINT/SIGTERM (or until ``feeder`` fails)."""
    stopping = asyncio.Event()
    watchdog = Watchdog(SHUTDOWN_DEADLINE)

    def on_signal() -> None:
        stopping.set()
        watchdog.arm()  # even while starting up: the steps to come may wait for a broker

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    async with contextlib.AsyncExitStack() as stack:
        service = "up" if parts.worker and parts.gateway else "worker" if parts.worker else "sink"
        if tracing.setup(service if parts.worker or parts.sink else "gateway"):
            stack.callback(tracing.shutdown)
            announce("tracing:   on (OTEL_TRACES_EXPORTER)")
        bootstrap = await start_broker(stack, settings, announce)
        auth = authenticator(settings)
        ctx = ApiContext(
            auth=auth,
            registry=Registry(settings.models_dir),
            limits=QueryLimits.from_settings(settings),
            export_max_rows=settings.export_max_rows,
            export_timeout=settings.export_timeout,
        )
        ctx.checks["broker"] = lambda: _broker_answers(bootstrap)
        failing: list[Failing] = []
        if parts.sink or settings.clickhouse_url is not None:
            store = await asyncio.to_thread(Store.open, settings)
            stack.callback(store.close)
            ctx.store = store
            ctx.checks["store"] = lambda: asyncio.to_thread(store.ping)
        if parts.sink:
            sink = await start_sink(stack, settings, bootstrap, store)
            ctx.checks["sink"] = _flag(lambda: sink.healthy)
        worker = None
        if parts.worker and parts.workers > 1:
            pool = WorkerPool(settings, bootstrap, parts.workers)
            await pool.start()
            stack.push_async_callback(pool.stop)
            failing.append(pool)
            announce(f"workers:   {parts.workers} processes, pids {pool.pids()}")
        elif parts.worker:
            worker = await start_worker(stack, settings, bootstrap)
            failing.append(worker)
            ctx.checks["model"] = _true
            ctx.checks["consuming"] = worker.consuming
        if parts.gateway:
            stream = await start_gateway(stack, settings, bootstrap, ctx)
        ctx.ondemand = OnDemand(
            ctx.registry, ctx.store, settings.horizon, settings.season, settings.ondemand_history
        )
        http = HttpServer(
            create_app(
                ctx,
                settings.rate_http,
                settings.cors_origins,
                max_body=settings.http_max_body,
                body_timeout=settings.http_body_timeout,
                trusted_proxies=settings.proxy_networks,
            ),
            settings.http_host,
            settings.http_port,
            header_timeout=settings.http_header_timeout,
            keep_alive=settings.http_keep_alive,
            max_connections=settings.http_max_connections,
            backlog=settings.http_backlog,
        )
        await http.start()
        stack.push_async_callback(http.stop)
        base = f"http://{settings.http_host}:{http.port}"
        if ctx.store is not None and ctx.store.embedded:
            owner.claim(settings.run_dir, base, auth.issue_process_token("analyst"))
            stack.callback(owner.release, settings.run_dir)
        if parts.sink and settings.backup_interval > 0:
            backups = asyncio.create_task(
                run_schedule(
                    store,
                    settings.data_dir,
                    settings.backups_dir,
                    settings.backup_interval,
                    settings.backup_keep,
                ),
                name="backups",
            )
            stack.push_async_callback(_cancel, backups)
            announce(f"backups:   every {settings.backup_interval:g}s into {settings.backups_dir}")

        announce(f"http:      {base}  (/healthz /readyz /metrics /v1/...)")
        if parts.gateway:
            ws = f"ws://{settings.http_host}:{stream.port}/v1/stream"
            announce(f"websocket: {ws}")
            viewer = auth.issue_process_token("viewer")
            announce(f"dashboard: {base}/#token={viewer}&ws={stream.port}")
        if not settings.auth:
            announce("auth:      OFF (FORECAST_AUTH=false): anyone on this host has admin rights")
        settle_heap(stack)
        announce("ready; Ctrl-C to stop")

        if feeder is not None:
            feed_task = asyncio.create_task(_feed(feeder, bootstrap, settings, announce))
            stack.push_async_callback(_cancel, feed_task)
        waits = [asyncio.create_task(stopping.wait())]
        waits += [asyncio.create_task(part.failed.wait()) for part in failing]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
        watchdog.reason = _failure(failing)
        watchdog.arm()
        announce("stopping")
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    if worker is None or worker.stopped:
        watchdog.disarm()  # else Faust's consumer thread may still hold the process
    reason = _failure(failing)
    if reason is not None:
        raise ForecastError(reason)


def _failure(failing: list[Failing]) -> str | None:
    """Why a part failed, as the process's last line says it."""
    for part in failing:
        if isinstance(part.failure, ForecastError):
            return f"the worker stopped: {part.failure.message}"
        if part.failure is not None:
            return f"the worker stopped on a fault: {part.failure!r}"
    return None


class Failing(Protocol):
    """A part that can fail while it runs: the process then stops, saying why."""

    failed: asyncio.Event
    failure: BaseException | None


async def start_broker(
    stack: contextlib.AsyncExitStack, settings: Settings, announce: Callable[[str], None]
) -> str:
    """The embedded broker (unless one is configured), with the engine's topics."""
    if settings.kafka_bootstrap is None:
        broker = await stack.enter_async_context(EmbeddedBroker(settings.broker_port))
        bootstrap = broker.bootstrap
        announce(f"kafka:     {bootstrap} (embedded tansu, in memory: nothing kept)")
    else:
        bootstrap = settings.kafka_bootstrap
        await wait_until_ready(bootstrap, 30.0)
        announce(f"kafka:     {bootstrap}")
    await ensure_topics(bootstrap, settings)
    return bootstrap


async def start_sink(
    stack: contextlib.AsyncExitStack, settings: Settings, bootstrap: str, store: Store
) -> Sink:
    """The ClickHouse sink (unless ClickHouse's Kafka engine stores the topics:
    ``FORECAST_SINK_CONSUME=false``), and the one retraining loop, which needs the store."""
    sink = Sink(settings, bootstrap, store)
    if settings.sink_consume:
        await sink.start()
        stack.push_async_callback(sink.stop)
    if settings.retrain:
        retrainer = Retrainer(settings, store, Registry(settings.models_dir))
        listener = DriftListener(settings, bootstrap, retrainer.notice)
        await listener.start()
        stack.push_async_callback(listener.stop)
        comparing = asyncio.create_task(retrainer.run(), name="retrain-compare")
        stack.push_async_callback(_cancel, comparing)
        stack.push_async_callback(retrainer.stop)
        webhooks = WebhookStore.from_settings(settings)
        retrainer.on_decision = lambda *decision: webhooks.emit(decision_event(*decision))
    return sink


async def start_worker(
    stack: contextlib.AsyncExitStack, settings: Settings, bootstrap: str
) -> Worker:
    """A stream worker serving the registry's models (hot-swapped as they change)."""
    threads = share_cpus(settings.inference_threads)
    log.info("inference on %d CPU threads", threads)
    watcher = ModelWatcher(
        Registry(settings.models_dir),
        settings.horizon,
        settings.season,
        pick_device(settings.device),
    )
    await asyncio.to_thread(watcher.refresh)
    worker = Worker(settings, bootstrap, lambda: watcher.current)
    await worker.start()
    stack.push_async_callback(worker.stop)
    watching = asyncio.create_task(watcher.run(), name="model-watcher")
    stack.push_async_callback(_cancel, watching)
    webhooks = WebhookStore.from_settings(settings)
    alerts = StallAlerts(worker, webhooks.emit, settings.worker_id)
    worker.on_online = CoverageAlerts(
        webhooks.emit, settings.worker_id, settings.alert_coverage_floor
    ).observe
    alerting = asyncio.create_task(alerts.run(), name="stall-alerts")
    stack.push_async_callback(_cancel, alerting)
    return worker


def settle_heap(stack: contextlib.AsyncExitStack) -> None:
    """Once the parts of a process are up: collect the garbage of the start-up, then move
    what lives on (modules, models, Faust, torch) out of the collector's generations: a
    full collection walked all of it and held the event loop for up to 0.3 s (a p99
    latency of its own), every few seconds under load. Objects made later are collected
    as before. From then on the C heap's free pages go back to the system every
    ``TRIM_EVERY`` seconds, until ``stack`` closes (:func:`trim_heap`)."""
    gc.collect()
    gc.freeze()
    if _MALLOC_TRIM is not None:
        trimming = asyncio.create_task(_trim_every(TRIM_EVERY), name="heap-trim")
        stack.push_async_callback(_cancel, trimming)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL(None).malloc_trim
    except (ValueError, OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Give the C heap's free pages back to the system. glibc keeps the pages that the
    transient buffers of batches (records, snapshots, JSON) once took: a worker that had
    filled 1,000 sensors' windows was 2.1 GiB resident, 0.6 GiB after a trim."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


async def _trim_every(seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(trim_heap)  # ctypes lets go of the GIL meanwhile


async def start_gateway(
    stack: contextlib.AsyncExitStack, settings: Settings, bootstrap: str, ctx: ApiContext
) -> StreamServer:
    """The live feed, the hub and the websocket server (the HTTP API is the caller's)."""
    hub = Hub(settings.replay_buffer)
    ctx.hub = hub
    feed = Feed(settings, bootstrap, hub)
    await feed.start()
    stack.push_async_callback(feed.stop)
    history = None if ctx.store is None else functools.partial(missed, ctx.store)
    stream = StreamServer(
        hub,
        ctx.auth,
        settings.http_host,
        settings.ws_port,
        settings.ws_queue_size,
        history,
        settings.rate_ws_connect,
        settings.rate_ws_messages,
        trusted_proxies=settings.proxy_networks,
    )
    await stream.start()
    stack.push_async_callback(stream.stop)
    await start_webhooks(stack, settings, bootstrap, ctx)
    return stream


async def start_webhooks(
    stack: contextlib.AsyncExitStack, settings: Settings, bootstrap: str, ctx: ApiContext
) -> Dispatcher:
    """The webhook store (for the API), its dispatcher, and drift events queued for it."""
    ctx.webhooks = WebhookStore.from_settings(settings)
    dispatcher = Dispatcher.from_settings(ctx.webhooks, settings)
    await dispatcher.start()
    stack.push_async_callback(dispatcher.stop)
    listener = DriftListener(
        settings,
        bootstrap,
        lambda found: dispatcher.offer(drift_event(e.to_message()) for e in found),
    )
    await listener.start()
    stack.push_async_callback(listener.stop)
    return dispatcher


class Watchdog:
    """Ends the process with exit status 1 if stopping takes longer than ``deadline``
    seconds (Faust waits up to a request timeout, 90 s, on a broker that does not answer)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.reason: str | None = None  # said on the way out, if stopping was for a fault
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(self.deadline, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        # Straight to the file descriptor: a logging lock held by a stuck thread must not
        # keep the process alive.
        line = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": "error",
            "logger": __name__,
            "message": f"stopping took longer than {self.deadline:.1f}s: exiting now",
        }
        os.write(2, orjson.dumps(line) + b"\n")
        if self.reason is not None:
            os.write(2, f"error: {self.reason}\n".encode())
        os._exit(1)


async def _feed(
    feeder: Feeder, bootstrap: str, settings: Settings, announce: Callable[[str], None]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await producer.start()
    try:
        sent = await feeder(producer, settings.topic("readings"))
        announce(f"feed done: {sent} readings sent")
    finally:
        await producer.stop()


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _broker_answers(bootstrap: str) -> bool:
    try:
        await wait_until_ready(bootstrap, 2.0)
        return True
    except Exception:  # readiness reports, it does not raise
        return False


async def _true() -> bool:
    return True


def _flag(value: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return value()

    return check

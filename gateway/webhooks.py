"""The webhook dispatcher: posts the queued deliveries of :mod:`sinks.webhooks`.

Each attempt resolves and checks the target again (:func:`sinks.webhook_targets.check_target`)
and connects to the checked address; no redirect is followed. A 2xx answer is delivered;
anything else (another status, a timeout, a refused target) is retried after an
exponential backoff with jitter, capped, up to ``max_attempts``. ``pause_after`` failures
in a row pause the endpoint (a log line, ``forecast_webhook_pauses``, and its state in
the list) until an admin resumes it. The queue is durable: a restarted dispatcher
carries on where the last one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

import httpx

from forecast import metrics
from forecast.errors import WebhookError
from forecast.settings import Settings
from sinks.webhook_targets import Target, check_target, sign
from sinks.webhooks import Due, Event, WebhookStore

log = logging.getLogger(__name__)

KEEP_DONE = 7 * 86_400.0  # seconds finished deliveries stay listed
MAX_ANSWER = 1024  # bytes of a receiver's answer kept as the error


def backoff(attempt: int, base: float, cap: float, rand: float) -> float:
    """Seconds before attempt ``attempt + 1``: ``base * 2**(attempt - 1)``, capped, times
    a jitter factor in [0.5, 1) from ``rand`` in [0, 1)."""
    return min(cap, base * 2.0 ** min(attempt - 1, 60)) * (0.5 + rand / 2)


class Dispatcher:
    """Claims due deliveries every ``poll`` seconds and posts them, ``concurrency`` at once."""

    def __init__(
        self,
        store: WebhookStore,
        *,
        timeout: float = 5.0,
        max_attempts: int = 12,
        pause_after: int = 8,
        backoff: float = 2.0,
        backoff_max: float = 900.0,
        poll: float = 0.5,
        concurrency: int = 8,
    ) -> None:
        self.store = store
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.pause_after = pause_after
        self.base, self.cap = backoff, backoff_max
        self.poll = poll
        self.concurrency = concurrency
        self.client = httpx.AsyncClient(
            follow_redirects=False, timeout=timeout, trust_env=False, verify=True
        )
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._offering: set[asyncio.Task] = set()

    @classmethod
    def from_settings(cls, store: WebhookStore, settings: Settings) -> Dispatcher:
        return cls(
            store,
            timeout=settings.webhook_timeout,
            max_attempts=settings.webhook_max_attempts,
            pause_after=settings.webhook_pause_after,
            backoff=settings.webhook_backoff,
            backoff_max=settings.webhook_backoff_max,
        )

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    async def stop(self) -> None:
        if self._offering:
            await asyncio.wait(self._offering, timeout=5.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.aclose()

    def offer(self, events: Iterable[Event]) -> None:
        """Queue ``events`` without blocking the event loop, then look for due deliveries."""
        task = asyncio.get_running_loop().create_task(self._offer(list(events)))
        self._offering.add(task)
        task.add_done_callback(self._offering.discard)

    async def _offer(self, events: list[Event]) -> None:
        try:
            for event in events:
                await asyncio.to_thread(self.store.emit, event)
        except Exception:  # the event is logged; the caller (a Kafka listener) goes on
            log.exception("webhook events not queued: %s", [e.id for e in events])
        self.wake()

    def wake(self) -> None:
        """Look for due deliveries now (something was just queued)."""
        self._wake.set()

    async def _run(self) -> None:
        pruned = 0.0
        while True:
            try:
                sent = await self.dispatch()
                if time.time() - pruned > 3600.0:
                    pruned = time.time()
                    await asyncio.to_thread(self.store.prune, pruned - KEEP_DONE)
                metrics.WEBHOOK_PAUSED.set(await asyncio.to_thread(self.store.paused))
            except Exception:  # the dispatcher outlives a bad round (a locked file, ...)
                log.exception("webhook dispatcher: round failed")
                sent = 0
            if sent == 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll)

    async def dispatch(self) -> int:
        """One round: claim what is due and send it; return how many were attempted."""
        lease = self.timeout + 30.0
        due = await asyncio.to_thread(self.store.claim, time.time(), lease, self.concurrency * 4)
        gate = asyncio.Semaphore(self.concurrency)

        async def one(item: Due) -> None:
            async with gate:
                await self.deliver(item)

        await asyncio.gather(*(one(item) for item in due))
        return len(due)

    async def deliver(self, item: Due) -> None:
        delivery = item.delivery
        status: int | None = None
        started = time.monotonic()
        try:
            target = await asyncio.to_thread(check_target_now, self.store, item.url)
            url, headers, extensions = target.pinned()
            timestamp = int(time.time())
            headers |= {
                "Content-Type": "application/json",
                "User-Agent": "forecast-webhooks/1",
                "X-Forecast-Event": delivery.event,
                "X-Forecast-Delivery": delivery.id,
                "X-Forecast-Signature": sign(item.secret, timestamp, delivery.body),
            }
            async with (
                asyncio.timeout(self.timeout),  # the whole attempt, a slow answer too
                self.client.stream(
                    "POST", url, content=delivery.body, headers=headers, extensions=extensions
                ) as answer,
            ):
                status = answer.status_code
                text = await _head(answer)
            latency = time.monotonic() - started
            metrics.WEBHOOK_SECONDS.observe(latency)
            if 200 <= status < 300:
                await asyncio.to_thread(self.store.delivered, delivery, status, latency)
                metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
                return
            error = f"HTTP {status}" + (f": {text}" if text else "")
        except WebhookError as exc:
            metrics.WEBHOOK_DELIVERIES.labels("refused").inc()
            error = exc.message
        except TimeoutError:
            error = f"no answer within {self.timeout:g}s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        await self._failed(item, status, error, time.monotonic() - started)

    async def _failed(self, item: Due, status: int | None, error: str, latency: float) -> None:
        delivery = item.delivery
        attempt = delivery.attempts + 1
        retry_at = None
        if attempt < self.max_attempts:
            retry_at = time.time() + backoff(attempt, self.base, self.cap, random.random())
        metrics.WEBHOOK_DELIVERIES.labels("failed" if retry_at else "gave_up").inc()
        log.warning(
            "webhook %s: delivery %s attempt %d failed: %s",
            delivery.endpoint_id,
            delivery.id,
            attempt,
            error,
        )
        paused = await asyncio.to_thread(
            self.store.failed, delivery, status, error, latency, retry_at, self.pause_after
        )
        if paused:
            metrics.WEBHOOK_PAUSES.inc()
            log.error(
                "webhook %s paused after %d failures in a row (%s); resume it with "
                "`forecast webhooks resume %s`",
                delivery.endpoint_id,
                self.pause_after,
                urlsplit(item.url).hostname,
                delivery.endpoint_id,
            )


def check_target_now(store: WebhookStore, url: str) -> Target:
    """The target checked against the store's policy, resolved now (blocking DNS)."""
    return check_target(url, store.policy, store.resolver)


async def _head(answer: httpx.Response) -> str:
    """The start of a receiver's answer (for the error), never more than MAX_ANSWER bytes."""
    kept = b""
    async for chunk in answer.aiter_raw():
        kept += chunk
        if len(kept) >= MAX_ANSWER:
            break
    return kept[:MAX_ANSWER].decode("utf-8", "replace").strip()

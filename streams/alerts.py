"""Alerts for webhooks from a worker's liveness: ``worker_stalled`` when it stops making
progress (FORECAST_STALL_TIMEOUT, the ``forecast_worker_stalled`` gauge), then
``worker_recovered`` or ``worker_failed`` (a fault or FORECAST_STALL_EXIT: it exits)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from forecast.errors import ForecastError
from sinks.webhooks import Event, alert_event
from streams.liveness import Liveness

log = logging.getLogger(__name__)


class Watched(Protocol):
    """What is watched of a worker (:class:`streams.worker.Worker`)."""

    liveness: Liveness
    failed: asyncio.Event
    failure: BaseException | None


class StallAlerts:
    """Emits an alert on each change of a worker's state, looking every ``interval`` s."""

    def __init__(
        self,
        worker: Watched,
        emit: Callable[[Event], object],
        worker_id: str,
        interval: float = 1.0,
    ) -> None:
        self.worker = worker
        self.emit = emit
        self.worker_id = worker_id
        self.interval = interval
        self.stalled = False

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.worker.failed.wait(), self.interval)
            if self.worker.failed.is_set():
                failure = self.worker.failure
                reason = failure.message if isinstance(failure, ForecastError) else repr(failure)
                await self._alert("worker_failed", f"worker {self.worker_id} stopped: {reason}")
                return
            stalled = self.worker.liveness.stalled()
            if stalled == self.stalled:
                continue
            self.stalled = stalled
            liveness = self.worker.liveness
            if stalled:
                message = (
                    f"worker {self.worker_id} made no progress for {liveness.idle_for():.0f}s: "
                    f"{liveness.cause or 'no records taken in'}"
                )
                await self._alert("worker_stalled", message)
            else:
                await self._alert("worker_recovered", f"worker {self.worker_id} makes progress")

    async def _alert(self, alert: str, message: str) -> None:
        detail = {"worker_id": self.worker_id}
        try:
            await asyncio.to_thread(self.emit, alert_event(alert, message, detail))
        except Exception:  # an alert that cannot be queued must not stop the worker
            log.exception("could not queue the alert %s", alert)

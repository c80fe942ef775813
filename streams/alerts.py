"""Alerts for webhooks from a worker: from its liveness, ``worker_stalled`` when it stops
making progress (FORECAST_STALL_TIMEOUT, the ``forecast_worker_stalled`` gauge), then
``worker_recovered`` or ``worker_failed`` (a fault or FORECAST_STALL_EXIT: it exits);
from the online statistics of its forecasts, ``coverage_collapsed`` and
``coverage_recovered`` per sensor, model and tracked horizon."""

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


class CoverageAlerts:
    """``coverage_collapsed`` when a sensor's online interval coverage (the
    ``forecast_online_coverage`` gauge) of a model at a tracked horizon falls below
    ``floor`` once ``min_scored`` residuals are in; ``coverage_recovered`` when it is back
    at ``floor + margin`` or more. One alert per change of each (sensor, model, horizon)."""

    def __init__(
        self,
        emit: Callable[[Event], object],
        worker_id: str,
        floor: float = 0.5,
        margin: float = 0.2,
        min_scored: int = 50,
    ) -> None:
        self.emit = emit
        self.worker_id = worker_id
        self.floor = floor
        self.margin = margin
        self.min_scored = min_scored
        self.collapsed: set[tuple[str, str, str]] = set()

    def observe(self, online: list[tuple[str, str, str, float, float, int]]) -> list[Event]:
        """The online statistics as the worker exports them: (sensor, model, horizon,
        MAE, coverage, residuals); queues and returns the alerts they raise."""
        events = []
        for sensor, model, horizon, _, coverage, scored in online:
            key = (sensor, model, horizon)
            if key in self.collapsed and coverage >= self.floor + self.margin:
                self.collapsed.discard(key)
                events.append(self._event("coverage_recovered", key, coverage, "is back at"))
            elif key not in self.collapsed and scored >= self.min_scored and coverage < self.floor:
                self.collapsed.add(key)
                events.append(self._event("coverage_collapsed", key, coverage, "fell to"))
        for event in events:
            try:
                self.emit(event)
            except Exception:  # an alert that cannot be queued must not stop the worker
                log.exception("could not queue the alert %s", event.data["alert"])
        return events

    def _event(self, alert: str, key: tuple[str, str, str], coverage: float, verb: str) -> Event:
        sensor, model, horizon = key
        message = (
            f"the online interval coverage of {model} for {sensor} at step {horizon} "
            f"{verb} {coverage:.2f}"
        )
        detail = {
            "worker_id": self.worker_id,
            "model": model,
            "horizon": int(horizon),
            "coverage": round(coverage, 4),
            "floor": self.floor,
        }
        return alert_event(alert, message, detail, (sensor,))

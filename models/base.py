"""What every streaming forecaster provides (pure maths, no I/O)."""

from __future__ import annotations

from typing import Protocol

from forecast.errors import ModelError

Interval = tuple[list[float], list[float], list[float]]  # yhat, lower, upper


class StreamingForecaster(Protocol):
    """A model advanced one reading at a time on a small JSON-able per-sensor state."""

    name: str
    version: int
    horizon: int

    def init_state(self) -> dict:
        """A fresh per-sensor state."""

    def update(self, state: dict, value: float) -> None:
        """Advance ``state`` by one reading (in place)."""

    def forecast(self, state: dict) -> Interval | None:
        """``horizon`` steps ahead with an interval, or None until enough data is seen."""


def check_finite(result: Interval) -> Interval:
    """Raise ModelError if a forecast holds a non-finite number."""
    for series in result:
        for x in series:
            if x != x or x in (float("inf"), float("-inf")):
                raise ModelError("forecast is not finite")
    return result

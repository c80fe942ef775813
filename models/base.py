"""What every streaming forecaster provides (pure maths, no I/O)."""

from __future__ import annotations

import math
from typing import Protocol

Interval = tuple[list[float], list[float], list[float]]  # yhat, lower, upper
Item = tuple[dict, float, float]  # per-sensor state, value, epoch seconds


class StreamingForecaster(Protocol):
    """A model advanced reading by reading on small JSON-able per-sensor states."""

    name: str
    version: int
    horizon: int

    def init_state(self) -> dict:
        """A fresh per-sensor state."""

    def step(self, items: list[Item]) -> list[Interval | None]:
        """Advance each state by its reading, in order (a state may appear several
        times); return the forecast after each reading, or None until enough history."""


def is_finite(result: Interval) -> bool:
    return all(math.isfinite(x) for series in result for x in series)

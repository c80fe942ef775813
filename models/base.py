"""What every streaming forecaster provides (pure maths, no I/O)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

Interval = tuple[list[float], list[float], list[float]]  # yhat, lower, upper
Item = tuple[dict, float, float]  # per-sensor state, value, epoch seconds


class NotDue(enum.Enum):
    """No forecast at this reading: the model forecasts every k readings."""

    NOT_DUE = "not due"


NOT_DUE = NotDue.NOT_DUE


class StreamingForecaster(Protocol):
    """A model advanced reading by reading on small JSON-able per-sensor states."""

    name: str
    version: int
    horizon: int

    def init_state(self) -> dict:
        """A fresh per-sensor state."""

    def correct(self, state: dict, value: float, newer: int, replace: bool) -> None:
        """Take a late reading into the state: ``newer`` readings already seen are newer
        than it; ``replace`` if it re-sends the reading just before those."""

    def step(self, items: list[Item]) -> list[Interval | NotDue | None]:
        """Advance each state by its reading, in order (a state may appear several
        times); return the forecast after each reading, None until enough history, or
        ``NOT_DUE`` between the forecasts of a model that forecasts every k readings."""


@dataclass(frozen=True)
class ModelSet:
    """What forecasts now: the baseline that always answers (the fallback), the
    production model (None = baseline only) and a shadow."""

    baseline: StreamingForecaster
    production: StreamingForecaster | None = None
    shadow: StreamingForecaster | None = None

    def serving(self) -> list[StreamingForecaster]:
        return [m for m in (self.baseline, self.production, self.shadow) if m is not None]


def place(window: list, value: float, newer: int, replace: bool, limit: int) -> None:
    """Put a late value into a window of the latest ``limit`` values (oldest first) where
    it belongs in time; a value older than the whole window changes nothing."""
    position = len(window) - newer
    if replace:
        if position >= 1:
            window[position - 1] = value
        return
    if position < 0 or (position == 0 and len(window) == limit):
        return
    window.insert(position, value)
    if len(window) > limit:
        del window[0]


def slide(window: object, value: float, limit: int) -> np.ndarray:
    """A window of the latest ``limit`` values with ``value`` appended, as a new float32
    array (a state restored from JSON holds a list). Compact: a sensor's window costs 4
    bytes a value, not the 32 of a list of Python floats."""
    old = np.asarray(window, dtype=np.float32)
    keep = old[-(limit - 1) :] if limit > 1 else old[:0]
    out = np.empty(len(keep) + 1, dtype=np.float32)
    out[:-1] = keep
    out[-1] = value
    return out


def placed(window: object, value: float, newer: int, replace: bool, limit: int) -> np.ndarray:
    """:func:`place` on a float32 window (or on its JSON list), as a new array."""
    values = np.asarray(window, dtype=np.float32).tolist()
    place(values, value, newer, replace, limit)
    return np.asarray(values, dtype=np.float32)


def is_finite(result: Interval) -> bool:
    """No NaN or infinity (a sum is NaN or infinite if any term is; it may also overflow
    for finite values near 1e308, which no sensor forecast reaches)."""
    return all(math.isfinite(sum(series)) for series in result)

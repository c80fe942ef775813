"""Reference forecasts scored under the same protocol as the trained models."""

from __future__ import annotations

import numpy as np

from models.data import windows


def score(yhat: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    error = yhat - targets
    return float((error**2).mean()), float(np.abs(error).mean())


def repeat_last(values: np.ndarray, lookback: int, horizon: int) -> tuple[float, float]:
    x, y = windows(values, lookback, horizon)
    return score(np.repeat(x[:, -1:], horizon, axis=1), y)


def seasonal_naive(
    values: np.ndarray, lookback: int, horizon: int, season: int
) -> tuple[float, float]:
    """What the streaming baseline forecasts once it has seen a season."""
    x, y = windows(values, lookback, horizon)
    steps = lookback - season + np.arange(horizon) % season
    return score(x[:, steps], y)

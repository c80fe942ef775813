"""Online seasonal-naive baseline with an empirical interval.

The forecast for step ``h`` repeats the value one season earlier (the last value until a
season is seen). The interval is ``yhat +- z * sigma * sqrt(1 + (h-1) // season)``, where
``sigma**2`` is an exponentially weighted mean of the squared one-step errors of the rule.
"""

from __future__ import annotations

import math

from models.base import Interval, Item, place

Z_90 = 1.6448536269514722  # two-sided 90% normal quantile


class SeasonalNaive:
    """Pure per-sensor forecaster; its state is a JSON-able dict."""

    name = "baseline"
    version = 1

    def __init__(self, horizon: int = 24, season: int = 24, alpha: float = 0.05) -> None:
        if horizon < 1 or season < 1 or not 0 < alpha <= 1:
            raise ValueError("horizon and season must be >= 1, alpha in (0, 1]")
        self.horizon = horizon
        self.season = season
        self.alpha = alpha
        # The interval's growth per step, and which value of a full season each step repeats.
        self._widths = [Z_90 * math.sqrt(1 + (h - 1) // season) for h in range(1, horizon + 1)]
        self._repeats = [(h - 1) % season for h in range(1, horizon + 1)]

    def init_state(self) -> dict:
        return {"history": [], "var": 0.0, "errors": 0}

    def update(self, state: dict, value: float) -> None:
        history: list[float] = state["history"]
        if history:
            error = value - self._one_step(history)
            weight = max(self.alpha, 1.0 / (state["errors"] + 1))
            state["var"] += weight * (error * error - state["var"])
            state["errors"] += 1
        history.append(value)
        if len(history) > self.season:
            del history[0]

    def correct(self, state: dict, value: float, newer: int, replace: bool) -> None:
        place(state["history"], value, newer, replace, self.season)

    def step(self, items: list[Item]) -> list[Interval | None]:
        out = []
        for state, value, _ in items:
            self.update(state, value)
            out.append(self.forecast(state))
        return out

    def forecast(self, state: dict) -> Interval | None:
        history: list[float] = state["history"]
        if not history:
            return None
        sigma = math.sqrt(state["var"])
        if len(history) == self.season:
            yhat = [history[i] for i in self._repeats]
        else:
            yhat = [history[-1]] * self.horizon
        halves = [sigma * width for width in self._widths]
        lower = [y - half for y, half in zip(yhat, halves, strict=True)]
        upper = [y + half for y, half in zip(yhat, halves, strict=True)]
        return yhat, lower, upper

    def _one_step(self, history: list[float]) -> float:
        return history[0] if len(history) == self.season else history[-1]

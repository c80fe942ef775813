"""Online seasonal-naive baseline with an empirical interval.

The forecast for step ``h`` repeats the value one season earlier (the last value until a
season is seen). The interval is ``yhat +- z * sigma * sqrt(1 + (h-1) // season)``, where
``sigma**2`` is an exponentially weighted mean of the squared one-step errors of the rule.

The season is either fixed (``season=24``) or each sensor's own (``season=None``): one
day of its readings (:mod:`models.timing`), from the median of its last spacings and the
readings of its last whole days, capped at ``max_season``. Half-hourly readings get 48,
five-minute readings of a business day the readings of a business day.
"""

from __future__ import annotations

import math

from models.base import Interval, Item, place
from models.timing import learn, timing_state

Z_90 = 1.6448536269514722  # two-sided 90% normal quantile
MAX_SEASON = 1440  # a day of one-minute readings


class SeasonalNaive:
    """Pure per-sensor forecaster; its state is a JSON-able dict."""

    name = "baseline"
    version = 1

    def __init__(
        self,
        horizon: int = 24,
        season: int | None = 24,
        alpha: float = 0.05,
        max_season: int = MAX_SEASON,
    ) -> None:
        if horizon < 1 or (season is not None and season < 0) or not 0 < alpha <= 1:
            raise ValueError("horizon must be >= 1, season >= 0, alpha in (0, 1]")
        if max_season < 2:
            raise ValueError("max_season must be >= 2")
        self.horizon = horizon
        self.season = season or None  # 0 or None: each sensor's own
        self.alpha = alpha
        self.max_season = self.season or max_season

    @property
    def learns(self) -> bool:
        """Each sensor's season comes from its own spacing."""
        return self.season is None

    def init_state(self) -> dict:
        state: dict = {"history": [], "var": 0.0, "errors": 0}
        if self.learns:
            state.update(timing_state())
        return state

    def update(self, state: dict, value: float, ts: float = math.nan) -> None:
        history: list[float] = state["history"]
        season = self.season_of(state)
        if history:
            error = value - self._one_step(history, season)
            weight = max(self.alpha, 1.0 / (state["errors"] + 1))
            state["var"] += weight * (error * error - state["var"])
            state["errors"] += 1
        if self.learns:
            season = learn(state, ts, self.max_season)
        history.append(value)
        del history[: max(0, len(history) - max(season, 1))]

    def correct(self, state: dict, value: float, newer: int, replace: bool) -> None:
        place(state["history"], value, newer, replace, max(self.season_of(state), 1))

    def step(self, items: list[Item]) -> list[Interval | None]:
        out = []
        for state, value, ts in items:
            self.update(state, value, ts)
            out.append(self.forecast(state))
        return out

    def forecast(self, state: dict) -> Interval | None:
        history: list[float] = state["history"]
        if not history:
            return None
        season = max(self.season_of(state), 1)
        sigma = math.sqrt(state["var"])
        if len(history) == season:
            yhat = [history[h % season] for h in range(self.horizon)]
        else:
            yhat = [history[-1]] * self.horizon
        steps = range(self.horizon)
        halves = [sigma * (Z_90 * math.sqrt(1 + h // season)) for h in steps]
        lower = [y - half for y, half in zip(yhat, halves, strict=True)]
        upper = [y + half for y, half in zip(yhat, halves, strict=True)]
        return yhat, lower, upper

    def season_of(self, state: dict) -> int:
        """The sensor's season now (0 while its step is unknown)."""
        return self.season if self.season is not None else state.get("season", 0)

    @staticmethod
    def _one_step(history: list[float], season: int) -> float:
        return history[0] if season and len(history) == season else history[-1]

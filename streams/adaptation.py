"""Online adaptation of one served model key's forecasts, per sensor slot (pure numpy).

The worker scores each forecast at the tracked horizons (``FORECAST_RESIDUAL_HORIZONS``,
:class:`streams.scoring.ScoreColumns`) as the actuals arrive. :class:`AdaptationColumns`
feeds those residuals, as they are completed, to a :class:`models.online.OnlineAdapter`
that learns at the tracked horizons, and corrects every new forecast, all of its steps,
by interpolating between them (:func:`models.online.knot_weights`). A forecast is only
corrected by what was learned from actuals that had arrived before it was issued: a
round's residuals are learned before the round's forecasts are corrected.

What the adapter learns from is what was published: the interval as issued (already
corrected) and the point as issued, less the bias the sensor carries now.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.online import OnlineAdapter, OnlineConfig, knot_weights
from streams.scoring import Scored
from streams.slots import rank_within


class AdaptationColumns:
    """Per-slot corrections of one model key, learned at ``horizons``."""

    def __init__(self, config: OnlineConfig, horizons: tuple[int, ...], capacity: int) -> None:
        self.horizons = tuple(int(h) for h in horizons)
        self.adapter = OnlineAdapter(
            dataclasses.replace(config, horizon=len(self.horizons)), capacity
        )
        self._weights: dict[int, np.ndarray] = {}  # forecast length -> (H, K)

    def grow(self, capacity: int) -> None:
        self.adapter.grow(capacity)

    def reset(self, slots: np.ndarray) -> None:
        self.adapter.reset(np.asarray(slots, np.int64))

    def learn(self, slots: np.ndarray, scored: Scored) -> None:
        """Learn from residuals just completed; ``slots[i]``: the slot of reading ``i``."""
        if not len(scored):
            return
        rows = np.asarray(slots, np.int64)[scored.index]
        column = np.searchsorted(self.horizons, scored.horizon)
        point = scored.yhat - self.adapter.bias[rows, column]
        key = rows * len(self.horizons) + column
        rank = rank_within(key)  # a step may complete two forecasts of one FIFO
        for r in range(int(rank.max()) + 1):
            at = rank == r
            self.adapter.update(
                rows[at],
                column[at],
                point[at],
                scored.lower[at],
                scored.upper[at],
                scored.actual[at],
            )

    def apply(
        self, slots: np.ndarray, yhat: np.ndarray, lower: np.ndarray, upper: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The corrected (yhat, lower, upper) of forecasts (n, H) about to be issued."""
        slots = np.asarray(slots, np.int64)
        if not len(slots):
            return yhat, lower, upper
        fresh = slots[self.adapter.pairs[slots] == 0]
        if len(fresh):  # the unit of the bounds: the model's own mean half-width
            at = np.isin(slots, fresh)
            half = np.nanmean((upper[at] - lower[at]) / 2, axis=1)
            ok = np.isfinite(half) & (half > 0)
            self.adapter.set_scale(slots[at][ok], half[ok])
        return self.adapter.apply(slots, yhat, lower, upper, self._knots(yhat.shape[1]))

    def _knots(self, horizon: int) -> np.ndarray:
        """(horizon, K): tracked horizons beyond the forecast's length learn nothing."""
        weights = self._weights.get(horizon)
        if weights is None:
            within = [j for j, h in enumerate(self.horizons) if h <= horizon]
            weights = np.zeros((horizon, len(self.horizons)))
            if within:
                knots = tuple(self.horizons[j] for j in within)
                weights[:, within] = knot_weights(knots, horizon)
            self._weights[horizon] = weights
        return weights

    def to_docs(self, slots: np.ndarray) -> list[dict]:
        return self.adapter.to_docs(np.asarray(slots, np.int64))

    def from_doc(self, slot: int, doc: dict) -> None:
        self.adapter.from_doc(slot, doc)

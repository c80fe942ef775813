"""Online adaptation of a served forecaster from delayed feedback (pure numpy).

Each row of the arrays is one sensor; each column one horizon step. A forecast issued
at a sensor's reading ``t`` for step ``h`` is scored when the reading ``t + h`` arrives:
:class:`Pending` keeps the issued forecasts and hands back exactly the *matured* pairs
(forecast, actual) when a reading arrives, so an adapter fed only by it cannot see an
actual that did not exist when a forecast was issued. :class:`OnlineAdapter` learns from
those pairs and corrects new forecasts, for many sensors at once:

* **Point**: an additive bias per sensor and step, learned by online gradient descent on
  the squared error, ``b <- b + bias_rate * (clip(y - yhat) - b)`` (an exponentially
  weighted mean of the model's residuals). The residual is clipped to ``error_clip``
  sensor scales before it is learned and ``|b|`` to ``max_bias`` scales, so a bad
  stretch moves it by a bounded amount per reading and never further than the cap.
* **Intervals**: quantile tracking (Angelopoulos, Candes & Tibshirani, "Conformal PID
  control", 2023; the ACI idea of Gibbs & Candes on the interval's scale): each side's
  half-width is the model's times ``exp(w)``, and each scored pair moves ``w`` by
  ``interval_rate * (miss - alpha / 2)``. While ``w`` stays inside its bounds the
  long-run miss rate of each side is ``alpha / 2`` whatever the drift
  (``|mean miss - alpha/2| <= (w_max - w_min) / (interval_rate * pairs)``); the bounds
  (``min_width``..``max_width`` times the model's width) keep a bad stretch from
  collapsing or exploding it.

The state is a few plain arrays (:meth:`OnlineAdapter.snapshot`/:meth:`restore`), to be
kept with the rest of a worker's crash-recoverable per-sensor state, whole
(:meth:`OnlineAdapter.snapshot`) or per sensor (:meth:`OnlineAdapter.to_docs`).

Defaults (``forecast bench online``, chosen on the validation split of ETTh1/ETTh2 at
horizon 96): ``interval_rate`` 0.005 (larger rates widen the intervals under a 96-step
delay: misses come in bursts the tracker hears of late); ``bias_rate`` 0, the point
correction off: on those validation splits every rate tried raised the MSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forecast.errors import ConfigError

_FLOOR = 1e-3  # a model half-width below this many sensor scales counts as this much
_NEVER = np.iinfo(np.int64).min  # a ring slot no forecast was issued in


@dataclass(frozen=True)
class OnlineConfig:
    """Rates and bounds of :class:`OnlineAdapter` (scales: the sensor's ``scale``)."""

    horizon: int
    coverage: float = 0.9
    interval_rate: float = 0.005  # step of the log width multiplier per scored pair
    bias_rate: float = 0.0  # weight of the newest residual in the bias (0: off)
    error_clip: float = 3.0  # residuals are clipped to this many scales before learning
    max_bias: float = 1.0  # |bias| <= this many scales
    min_width: float = 0.25  # the width multiplier stays within [min_width, max_width]
    max_width: float = 4.0

    def __post_init__(self) -> None:
        checks = {
            "horizon": self.horizon >= 1,
            "coverage": 0.0 < self.coverage < 1.0,
            "interval_rate": self.interval_rate >= 0.0,
            "bias_rate": 0.0 <= self.bias_rate <= 1.0,
            "error_clip": self.error_clip > 0.0,
            "max_bias": self.max_bias >= 0.0,
            "min_width": 0.0 < self.min_width <= 1.0,
            "max_width": self.max_width >= 1.0,
        }
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                f"online adaptation: bad {', '.join(bad)} (coverage in (0, 1), rates >= 0, "
                "bias rate <= 1, min_width in (0, 1], max_width >= 1)"
            )

    @property
    def alpha(self) -> float:
        return 1.0 - self.coverage


_STATE = ("scale", "bias", "log_lower", "log_upper", "pairs")


class OnlineAdapter:
    """Per-sensor (row) corrections of a forecaster's point and intervals per step."""

    def __init__(self, config: OnlineConfig, capacity: int = 0) -> None:
        self.config = config
        horizon = config.horizon
        self.scale = np.ones(0)
        self.bias = np.zeros((0, horizon))
        self.log_lower = np.zeros((0, horizon))
        self.log_upper = np.zeros((0, horizon))
        self.pairs = np.zeros(0, dtype=np.int64)  # scored pairs learned, per sensor
        self.grow(capacity)

    @property
    def capacity(self) -> int:
        return len(self.scale)

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` sensors; new rows start neutral (no correction)."""
        extra = capacity - self.capacity
        if extra <= 0:
            return
        horizon = self.config.horizon
        self.scale = np.concatenate([self.scale, np.ones(extra)])
        self.bias = np.concatenate([self.bias, np.zeros((extra, horizon))])
        self.log_lower = np.concatenate([self.log_lower, np.zeros((extra, horizon))])
        self.log_upper = np.concatenate([self.log_upper, np.zeros((extra, horizon))])
        self.pairs = np.concatenate([self.pairs, np.zeros(extra, dtype=np.int64)])

    def set_scale(self, rows: np.ndarray, scale: np.ndarray | float) -> None:
        """The unit of the bounds for these sensors (e.g. their training std)."""
        scale = np.broadcast_to(np.asarray(scale, dtype=float), np.shape(rows))
        if not np.all(np.isfinite(scale) & (scale > 0)):
            raise ConfigError("online adaptation: a sensor's scale must be finite and > 0")
        self.scale[rows] = scale

    def apply(
        self,
        rows: np.ndarray,
        point: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        knots: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Corrected (point, lower, upper) of forecasts (n, H) just issued for ``rows``.

        ``knots`` (H, K): each forecast step's weights over the K learned columns, for an
        adapter that learns at a few tracked steps and interpolates between them (see
        :func:`knot_weights`); None: step ``h`` is column ``h``."""
        rows = np.asarray(rows)

        def at(learned: np.ndarray) -> np.ndarray:
            if knots is None:
                return learned[rows]
            # Not a matrix product: BLAS may round differently for another number of rows,
            # and a sensor's forecasts must not depend on which others share its batch.
            # The knots' terms are added in order, as a sum over so few terms adds them.
            picked = learned[rows]
            total = picked[:, :1] * knots[:, 0]
            for k in range(1, knots.shape[1]):
                total += picked[:, k : k + 1] * knots[:, k]
            return total

        floor = _FLOOR * self.scale[rows][:, None]
        below = np.maximum(point - lower, floor) * np.exp(at(self.log_lower))
        above = np.maximum(upper - point, floor) * np.exp(at(self.log_upper))
        centre = point + at(self.bias)
        return centre, centre - below, centre + above

    def update(
        self,
        rows: np.ndarray,
        steps: np.ndarray,
        point: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        actual: np.ndarray,
    ) -> None:
        """Learn from matured pairs: for step ``steps`` (0-based) of each row, the model's
        own (uncorrected) ``point`` forecast, the interval as issued (corrected, by
        :meth:`apply`) and the actual that has arrived for it. A (row, step) appears at
        most once per call (split bigger batches into rounds); non-finite pairs are
        skipped."""
        rows, steps = np.broadcast_arrays(np.asarray(rows), np.asarray(steps))
        rows, steps = rows.ravel(), steps.ravel()
        if not len(rows):
            return
        keys = rows * self.config.horizon + steps
        if len(np.unique(keys)) != len(keys):
            raise ConfigError("online adaptation: a (sensor, step) pair repeats in one update")
        point, lower, upper, actual = (np.ravel(a) for a in (point, lower, upper, actual))
        finite = np.isfinite(point) & np.isfinite(lower) & np.isfinite(upper) & np.isfinite(actual)
        if not finite.all():  # a NaN would stick in the state: such a pair teaches nothing
            rows, steps, point, lower, upper, actual = (
                a[finite] for a in (rows, steps, point, lower, upper, actual)
            )
        self._learn_intervals(rows, steps, lower, upper, actual)
        self._learn_bias(rows, steps, point, actual)
        np.add.at(self.pairs, rows, 1)

    def _learn_intervals(self, rows, steps, lower, upper, actual) -> None:
        config = self.config
        side_alpha = config.alpha / 2
        bounds = np.log(config.min_width), np.log(config.max_width)
        for log_width, missed in (
            (self.log_lower, actual < lower),
            (self.log_upper, actual > upper),
        ):
            moved = log_width[rows, steps] + config.interval_rate * (missed - side_alpha)
            log_width[rows, steps] = np.clip(moved, *bounds)

    def _learn_bias(self, rows, steps, point, actual) -> None:
        config = self.config
        scale = self.scale[rows]
        error = np.clip(actual - point, -config.error_clip * scale, config.error_clip * scale)
        bias = self.bias[rows, steps]
        bias = bias + config.bias_rate * (error - bias)
        self.bias[rows, steps] = np.clip(bias, -config.max_bias * scale, config.max_bias * scale)

    def snapshot(self) -> dict[str, np.ndarray]:
        """The state as plain arrays (copies)."""
        return {name: getattr(self, name).copy() for name in _STATE}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Take a :meth:`snapshot` back (a snapshot of another horizon is refused)."""
        shape = np.shape(state["bias"])
        if len(shape) != 2 or shape[1] != self.config.horizon:
            raise ConfigError(
                f"online adaptation: a snapshot of shape {shape} does not fit horizon "
                f"{self.config.horizon}"
            )
        for name in _STATE:
            setattr(self, name, np.array(state[name], dtype=getattr(self, name).dtype))

    def to_docs(self, rows: np.ndarray) -> list[dict]:
        """Per-sensor documents of these rows (for a worker's per-sensor snapshots)."""
        fields = {name: getattr(self, name)[np.asarray(rows)].tolist() for name in _STATE}
        return [
            dict(zip(_STATE, values, strict=True)) for values in zip(*fields.values(), strict=True)
        ]

    def from_doc(self, row: int, doc: dict) -> None:
        """Restore one row from :meth:`to_docs` (a document of another horizon resets it)."""
        if len(doc.get("bias", ())) != self.config.horizon:
            self.reset(np.array([row]))
            return
        for name in _STATE:  # every field: nothing of the row's former state is left
            getattr(self, name)[row] = doc[name]

    def reset(self, rows: np.ndarray) -> None:
        """Forget what these rows learned (scale 1, no correction)."""
        for name in _STATE:
            getattr(self, name)[rows] = 1 if name == "scale" else 0


def knot_weights(knots: tuple[int, ...], horizon: int) -> np.ndarray:
    """(horizon, K) weights that interpolate values learned at the steps ``knots``
    (1-based, increasing) to every step 1..``horizon``: linear between two knots,
    the nearest knot's value before the first and after the last."""
    steps = np.arange(1, horizon + 1, dtype=float)
    eye = np.eye(len(knots))
    return np.stack([np.interp(steps, knots, eye[j]) for j in range(len(knots))], axis=1)


class Pending:
    """Issued forecasts awaiting their actuals, per sensor (row): a ring of the last
    ``horizon`` issues. Each sensor's clock counts its readings; a forecast issued after
    reading ``t`` matures, step ``h`` at a time, as reading ``t + h`` arrives."""

    def __init__(self, horizon: int, capacity: int = 0) -> None:
        self.horizon = horizon
        self.clock = np.zeros(0, dtype=np.int64)  # index of each sensor's last reading
        self.issued_at = np.zeros((0, horizon), dtype=np.int64)  # per ring slot
        self.forecasts = np.zeros((0, horizon, 3, horizon), dtype=np.float32)
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        extra = capacity - len(self.clock)
        if extra <= 0:
            return
        horizon = self.horizon
        self.clock = np.concatenate([self.clock, np.full(extra, -1, dtype=np.int64)])
        self.issued_at = np.concatenate(
            [self.issued_at, np.full((extra, horizon), _NEVER, dtype=np.int64)]
        )
        self.forecasts = np.concatenate(
            [self.forecasts, np.zeros((extra, horizon, 3, horizon), dtype=np.float32)]
        )

    def arrive(
        self, rows: np.ndarray, actual: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A new reading for each of ``rows`` (distinct): the matured pairs as
        (rows, steps, point, lower, upper, actual), ready for :meth:`OnlineAdapter.update`."""
        rows = np.asarray(rows)
        self.clock[rows] += 1
        now = self.clock[rows][:, None]
        issued = now - np.arange(1, self.horizon + 1)[None, :]  # (n, H): step h-1 <- t-h
        slots = issued % self.horizon
        ready = self.issued_at[rows[:, None], slots] == issued
        which, step = np.nonzero(ready)
        got = self.forecasts[rows[which], slots[which, step], :, step].astype(float)
        values = np.asarray(actual, dtype=float)[which]
        return rows[which], step, got[:, 0], got[:, 1], got[:, 2], values

    def issue(
        self, rows: np.ndarray, point: np.ndarray, lower: np.ndarray, upper: np.ndarray
    ) -> None:
        """Forecasts (n, H) issued after each row's latest reading: the model's own
        point and the interval as issued (what :meth:`OnlineAdapter.update` learns from)."""
        rows = np.asarray(rows)
        if np.any(self.clock[rows] < 0):
            raise ConfigError("online adaptation: a forecast issued before any reading")
        slots = self.clock[rows] % self.horizon
        self.issued_at[rows, slots] = self.clock[rows]
        self.forecasts[rows, slots] = np.stack([point, lower, upper], axis=1)

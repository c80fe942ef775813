"""Per-sensor features, computed incrementally from River statistics (pure, no I/O).

For every reading of a sensor, :class:`OnlineFeatures` returns the row that
:func:`batch_features` computes with pandas over the whole series up to that reading:

==================  ================================================================
``lag_k``           the value ``k`` readings earlier (``stats.Shift``)
``diff_k``          the value minus the value ``k`` readings earlier
``mean_w``          rolling mean over the last ``w`` readings (``utils.Rolling(Mean)``)
``std_w``           rolling sample standard deviation (``utils.Rolling(Var)``, ddof 1)
``min_w/max_w``     rolling minimum and maximum (``stats.RollingMin/RollingMax``)
``ewm_a``           exponentially weighted mean, ``m = a * x + (1 - a) * m``
                    (``stats.EWMean``; pandas ``ewm(alpha=a, adjust=False)``)
``hour_*/dow_*``    hour of day and day of week as sine/cosine (UTC)
covariate names     the covariate's latest value (carried forward; NaN before the first)
==================  ================================================================

The defaults assume hourly readings (24 of them a day); :meth:`FeatureSpec.for_season`
gives the same features for another season of readings (288 for five-minute data).

A feature is NaN until enough readings exist (``w`` for windows, ``k + 1`` for lags and
differences). The live River objects sit in a :class:`FeatureState`; its JSON form is the
last readings plus the weighted means, which rebuild the same statistics exactly (the
windows only need their last ``w`` values), so the state survives a restart.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import pandas as pd
from river import stats, utils

from models.base import place
from models.data import calendar

REFRESH = 4096  # readings between re-sums of the rolling mean and variance
CALENDAR = ("hour_sin", "hour_cos", "dow_sin", "dow_cos")


@dataclass(frozen=True)
class FeatureSpec:
    """Which features to compute; windows, lags and differences count readings."""

    lags: tuple[int, ...] = (1, 24)
    diffs: tuple[int, ...] = (1, 24)
    windows: tuple[int, ...] = (24,)
    ewm_alphas: tuple[float, ...] = (0.1,)
    covariates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(k < 1 for k in (*self.lags, *self.diffs)) or any(w < 2 for w in self.windows):
            raise ValueError("lags and differences must be >= 1, windows >= 2")
        if any(not 0 < a <= 1 for a in self.ewm_alphas):
            raise ValueError("EWM alphas must lie in (0, 1]")

    @classmethod
    def for_season(cls, season: int, **given: object) -> FeatureSpec:
        """The default features with one season of readings where the default has 24
        (one day of hourly readings): ``lag_s``, ``diff_s`` and the window of ``s``; the
        names are the default's for ``season=24``. ``given`` overrides any field."""
        fields = {"lags": (1, season), "diffs": (1, season), "windows": (season,)}
        return cls(**{**fields, **given})

    @property
    def names(self) -> list[str]:
        out = [f"lag_{k}" for k in self.lags] + [f"diff_{k}" for k in self.diffs]
        for w in self.windows:
            out += [f"mean_{w}", f"std_{w}", f"min_{w}", f"max_{w}"]
        out += [f"ewm_{a:g}" for a in self.ewm_alphas]
        return out + list(CALENDAR) + list(self.covariates)

    @property
    def memory(self) -> int:
        """How many past readings rebuild every statistic."""
        return max((*self.lags, *self.diffs, *self.windows, 1))


class FeatureState:
    """The live statistics of one sensor."""

    __slots__ = (
        "ewms",
        "last",
        "maxs",
        "means",
        "mins",
        "recent",
        "seen",
        "shifts",
        "spec",
        "variances",
    )

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.recent: deque[float] = deque(maxlen=spec.memory)
        self.seen = 0
        shifts = sorted({*spec.lags, *spec.diffs})
        self.shifts = {k: stats.Shift(k) for k in shifts}
        self.means = {w: utils.Rolling(stats.Mean, window_size=w) for w in spec.windows}
        self.variances = {w: _rolling_var(w) for w in spec.windows}
        self.mins = {w: stats.RollingMin(w) for w in spec.windows}
        self.maxs = {w: stats.RollingMax(w) for w in spec.windows}
        self.ewms = {a: stats.EWMean(fading_factor=a) for a in spec.ewm_alphas}
        self.last: dict[str, float] = {}  # latest covariate values

    def learn(self, value: float) -> None:
        """Advance every statistic by one reading."""
        self.recent.append(value)
        self.seen += 1
        if self.seen % REFRESH == 0:
            self._refresh()
        for shift in self.shifts.values():
            shift.update(value)
        for group in (self.means, self.variances, self.mins, self.maxs):
            for stat in group.values():
                stat.update(value)
        for ewm in self.ewms.values():
            ewm.update(value)

    def _refresh(self) -> None:
        """Re-sum the rolling statistics from their windows: adding and removing values
        for ever lets rounding errors wander, which a small variance's root magnifies."""
        for w in self.spec.windows:
            window = list(self.recent)[-w:]
            self.means[w] = utils.Rolling(stats.Mean, window_size=w)
            self.variances[w] = _rolling_var(w)
            for value in window[:-1]:
                self.means[w].update(value)
                self.variances[w].update(value)

    def corrected(self, value: float, newer: int, replace: bool) -> FeatureState:
        """The state as if a late value had come in time (the weighted means, which
        summarise everything before, are kept as they are)."""
        values = list(self.recent)
        place(values, value, newer, replace, self.spec.memory)
        doc = {**self.to_json(), "recent": values}
        return FeatureState.from_json(self.spec, doc)

    def to_json(self) -> dict:
        return {
            "recent": list(self.recent),
            "ewm": [ewm.get() for ewm in self.ewms.values()] if self.recent else [],
            "last": self.last,
        }

    @classmethod
    def from_json(cls, spec: FeatureSpec, doc: dict) -> FeatureState:
        state = cls(spec)
        for value in doc["recent"]:
            state.learn(value)
        # A weighted mean restarts at its first value, so one update restores it.
        for alpha, mean in zip(spec.ewm_alphas, doc["ewm"], strict=False):
            state.ewms[alpha] = stats.EWMean(fading_factor=alpha)
            state.ewms[alpha].update(mean)
        state.last = dict(doc["last"])
        return state


class OnlineFeatures:
    """Computes :attr:`FeatureSpec.names` for each reading of a sensor, incrementally."""

    def __init__(self, spec: FeatureSpec | None = None) -> None:
        self.spec = spec or FeatureSpec()
        self.names = self.spec.names

    def init_state(self) -> FeatureState:
        return FeatureState(self.spec)

    def restore(self, doc: FeatureState | dict) -> FeatureState:
        """The live state from itself or from its JSON form."""
        return doc if isinstance(doc, FeatureState) else FeatureState.from_json(self.spec, doc)

    def update(
        self, state: FeatureState, value: float, ts: float, covariates: dict | None = None
    ) -> list[float]:
        """Learn one reading and return its feature row (NaN where not yet defined)."""
        state.learn(value)
        seen = len(state.recent)
        row = []
        lagged = {k: _or_nan(shift.get()) for k, shift in state.shifts.items()}
        row += [lagged[k] for k in self.spec.lags]
        row += [value - lagged[k] for k in self.spec.diffs]
        for w in self.spec.windows:
            if seen < w:
                row += [math.nan] * 4
                continue
            variance = max(state.variances[w].get(), 0.0)
            row += [
                state.means[w].get(),
                math.sqrt(variance),
                state.mins[w].get(),
                state.maxs[w].get(),
            ]
        row += [ewm.get() for ewm in state.ewms.values()]
        row += calendar(np.array(ts)).tolist()
        if covariates:
            state.last.update(covariates)
        row += [state.last.get(name, math.nan) for name in self.spec.covariates]
        return row


def batch_features(
    values: np.ndarray,
    ts: np.ndarray,
    spec: FeatureSpec | None = None,
    covariates: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The same features for a whole series at once, with pandas (training, checks)."""
    spec = spec or FeatureSpec()
    x = pd.Series(values, dtype="float64")
    out: dict[str, pd.Series | np.ndarray] = {}
    for k in spec.lags:
        out[f"lag_{k}"] = x.shift(k)
    for k in spec.diffs:
        out[f"diff_{k}"] = x.diff(k)
    for w in spec.windows:
        rolling = x.rolling(w)
        out[f"mean_{w}"] = rolling.mean()
        out[f"std_{w}"] = rolling.std(ddof=1)
        out[f"min_{w}"] = rolling.min()
        out[f"max_{w}"] = rolling.max()
    for a in spec.ewm_alphas:
        out[f"ewm_{a:g}"] = x.ewm(alpha=a, adjust=False).mean()
    cal = calendar(np.asarray(ts, dtype="float64"))
    for i, name in enumerate(CALENDAR):
        out[name] = cal[:, i]
    for name in spec.covariates:
        column = covariates[name] if covariates is not None and name in covariates else None
        out[name] = (
            pd.Series(np.nan, index=x.index) if column is None else column.reset_index(drop=True)
        ).ffill()
    return pd.DataFrame(out)[spec.names]


def _rolling_var(window: int) -> utils.Rolling:
    return utils.Rolling(stats.Var, window_size=window, ddof=1)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value

"""Forecasts on demand: from a whole series at once, what the streaming forecasters give
after its last reading (pure maths, no I/O).

Each kind runs the streaming path's own arithmetic over the series, for many series in
one forward pass of the network:

* the baseline (:class:`models.baseline.SeasonalNaive`): :class:`models.columns.NaiveColumns`
  advanced reading by reading over all the series at once (numpy only);
* the LSTM: the recurrence from a zero state at the first full window, as the stream
  starts a sensor, over every later reading; the series' input sequences are packed into
  one ``nn.LSTM`` call, then the linear path and the head at each series' last window;
* the TFT: the input rows of :func:`models.tft.input_rows` from the batch features,
  the last ``lookback`` of them, and one network call for all the series. Future known
  covariates (the calendar features it was trained on) may be overridden per series.

A series with too few readings for the model gets None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pack_sequence

from models.base import StreamingForecaster
from models.baseline import SeasonalNaive
from models.columns import NaiveColumns
from models.data import calendar
from models.lstm import EPS, LSTMForecaster
from models.tft import KNOWN, TFTForecaster, _series_rows, forward_known, warm_up


@dataclass(frozen=True, slots=True)
class Series:
    """One sensor's readings, oldest first (float64 values and epoch seconds)."""

    values: np.ndarray
    ts: np.ndarray
    covariates: Mapping[str, Sequence[float]] | None = None  # future known inputs

    @property
    def step(self) -> float:
        """The latest spacing (as the stream's step); NaN with one reading."""
        return float(self.ts[-1] - self.ts[-2]) if len(self.ts) > 1 else float("nan")


@dataclass(frozen=True, slots=True)
class Made:
    """A forecast of every step of the model's horizon."""

    yhat: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def covariate_names(forecaster: StreamingForecaster) -> tuple[str, ...]:
    """The future known inputs a forecaster takes (empty: it takes none)."""
    if isinstance(forecaster, TFTForecaster):
        return tuple(name for name in forecaster.net.hparams.x_reals if name in KNOWN)
    return ()


def needed(forecaster: StreamingForecaster) -> int:
    """Readings a series needs before ``forecaster`` forecasts it."""
    if isinstance(forecaster, LSTMForecaster):
        return forecaster.lookback
    if isinstance(forecaster, TFTForecaster):
        return forecaster.lookback + warm_up(forecaster.season)
    return 1


def forecast_many(forecaster: StreamingForecaster, series: Sequence[Series]) -> list[Made | None]:
    """The forecast after the last reading of each series, all in one pass."""
    if isinstance(forecaster, SeasonalNaive):
        return _naive(forecaster, series)
    if isinstance(forecaster, LSTMForecaster):
        return _lstm(forecaster, series)
    if isinstance(forecaster, TFTForecaster):
        return _tft(forecaster, series)
    raise TypeError(f"no on-demand path for {type(forecaster).__name__}")


def _naive(model: SeasonalNaive, series: Sequence[Series]) -> list[Made | None]:
    columns = NaiveColumns(model, max(1, len(series)))
    lengths = np.asarray([len(s.values) for s in series], np.int64)
    padded = np.zeros((len(series), int(lengths.max(initial=0))))
    for i, s in enumerate(series):
        padded[i, : len(s.values)] = s.values
    for t in range(padded.shape[1]):
        slots = np.flatnonzero(lengths > t)
        columns.advance(slots, padded[slots, t], np.zeros(len(slots)))
    out: list[Made | None] = [None] * len(series)
    ready = np.flatnonzero(lengths > 0)
    if len(ready):
        made = columns._forecast(ready)
        for j, i in enumerate(ready.tolist()):
            out[i] = Made(made.yhat[j], made.lower[j], made.upper[j])
    return out


@torch.inference_mode()
def _lstm(model: LSTMForecaster, series: Sequence[Series]) -> list[Made | None]:
    net, lookback, device = model.net, model.lookback, model.device
    ready = [i for i, s in enumerate(series) if len(s.values) >= lookback]
    out: list[Made | None] = [None] * len(series)
    if not ready:
        return out
    inputs, last = [], []
    for i in ready:
        values = torch.from_numpy(series[i].values.astype(np.float32)).to(device)
        win = values.unfold(0, lookback, 1)  # every full window, as the stream's ring
        mean = win.mean(-1)
        std = win.std(-1, unbiased=False) + EPS
        ts = series[i].ts[lookback - 1 :]
        cal = torch.as_tensor(calendar(ts), dtype=win.dtype, device=device)
        inputs.append(torch.cat([((win[:, -1] - mean) / std).unsqueeze(-1), cal], -1))
        last.append(win[-1])
    _, (h, _) = net.lstm(pack_sequence(inputs, enforce_sorted=False))
    win = torch.stack(last)
    mean = win.mean(-1)
    std = win.std(-1, unbiased=False) + EPS
    linear = (win - mean.unsqueeze(-1)) @ net.linear + mean.unsqueeze(-1)
    yhat = linear + std.unsqueeze(-1) * net.head(h[0])
    half = std.unsqueeze(-1) * model.quantiles
    yhat_, lower, upper = (
        t.cpu().numpy().astype(np.float64) for t in (yhat, yhat - half, yhat + half)
    )
    for j, i in enumerate(ready):
        out[i] = Made(yhat_[j], lower[j], upper[j])
    return out


def _tft(model: TFTForecaster, series: Sequence[Series]) -> list[Made | None]:
    lookback, horizon = model.lookback, model.horizon
    out: list[Made | None] = [None] * len(series)
    encoders, known, ready = [], [], []
    for i, s in enumerate(series):
        if len(s.values) < needed(model) or len(s.values) < 2:
            continue
        rows = _series_rows(s.values, s.ts, model.season)[-lookback:]
        if not np.isfinite(rows).all():
            continue
        future = calendar(s.ts[-1] + s.step * np.arange(1, horizon + 1))
        for name, given in (s.covariates or {}).items():
            values = np.asarray(given, np.float64)
            future[: len(values), KNOWN.index(name)] = values[:horizon]
        encoders.append(rows.astype(np.float32))
        known.append(future)
        ready.append(i)
    if not ready:
        return out
    quantiles = forward_known(model.net, np.stack(encoders), np.stack(known))
    low = np.minimum(quantiles[..., 0], quantiles[..., 1])
    high = np.maximum(quantiles[..., 2], quantiles[..., 1])
    for j, i in enumerate(ready):
        out[i] = Made(quantiles[j, :, 1], low[j], high[j])
    return out

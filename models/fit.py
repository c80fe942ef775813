"""Train a model of either kind on a series and describe it for the registry.

:func:`fit` splits the series (the ETT protocol unless told otherwise, as ``forecast
bench accuracy`` wants; ``forecast train`` passes its fractions of every row), detects
the step and the season of readings (:func:`models.data.timing`), trains, scores the
model overall, per target and per step against a seasonal naive of one season, and
builds the artifact and its metadata (fields: :mod:`models.registry`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch

from forecast.errors import ConfigError
from models.data import Series, Split, SplitPlan, Timing, timing
from models.tft import TFTConfig, TFTResult, train_tft, warm_up
from models.train import TrainConfig, TrainResult, train_lstm

KINDS = ("lstm", "tft")
Progress = Callable[[int, dict], None]
# What `forecast train` trains for when not told: at most this many epochs, stopping
# after `patience` without a better validation loss. The configurations' own defaults
# (lstm 10/3, tft 6/2) are what `forecast bench accuracy` publishes.
TRAIN_DEFAULTS = {"lstm": {"epochs": 50, "patience": 5}, "tft": {"epochs": 20, "patience": 3}}


@dataclass
class Fitted:
    kind: str
    config: TrainConfig | TFTConfig
    split: Split
    result: TrainResult | TFTResult
    artifact: dict
    meta: dict
    timing: Timing | None = None
    baseline: dict | None = None  # the seasonal naive's test scores (None: no full season)


def configure(kind: str, **options: object) -> TrainConfig | TFTConfig:
    """The kind's defaults with the given options (None keeps a default); unknown
    options for a kind are refused."""
    default = {"lstm": TrainConfig, "tft": TFTConfig}[kind]()
    names = {f.name for f in fields(default)}
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted("--" + name.replace("_", "-") for name in set(given) - names)
    if foreign:
        raise ConfigError(f"{kind} does not take {', '.join(foreign)}")
    config = replace(default, **given)
    if kind == "tft" and config.epochs < 1:
        raise ConfigError("tft needs --epochs 1 or more (it has no closed-form start)")
    return config


def warm_up_readings(kind: str, lookback: int, season: int) -> int:
    """Readings of a sensor before the model forecasts it (the baseline serves before)."""
    return lookback + (warm_up(season) if kind == "tft" else 0)


@dataclass
class Prepared:
    """What training will do, before it does it: the configuration (a TFT's season
    filled in), the step and season, and the split."""

    kind: str
    series: Series
    config: TrainConfig | TFTConfig
    plan: SplitPlan
    timing: Timing
    split: Split


def prepare(
    kind: str,
    series: Series,
    config: TrainConfig | TFTConfig,
    *,
    plan: SplitPlan | None = None,
    season: int | None = None,
) -> Prepared:
    """Check what can be trained and split the series (``plan``, default the ETT
    protocol). ``season`` (readings) overrides the detected one (so does a TFT
    configuration's season other than the default 24)."""
    if series.covariate_columns:
        raise ConfigError(
            f"{kind} does not use covariates yet: it forecasts each target from its own "
            "history and the calendar; leave out --covariates "
            f"({', '.join(series.covariate_columns)}), or name them in --target to forecast "
            "them too"
        )
    plan = plan or SplitPlan("ett")
    if season is None and kind == "tft" and config.season != TFTConfig.season:
        season = config.season  # a TFT configured for another season keeps it
    when = timing(series.ts, season)
    if kind == "tft":
        config = replace(config, season=when.season)
        context = config.lookback + warm_up(config.season)
    else:
        context = config.lookback
    return Prepared(kind, series, config, plan, when, plan.apply(series, context, config.horizon))


def fit(
    kind: str,
    series: Series,
    config: TrainConfig | TFTConfig,
    progress: Progress | None = None,
    *,
    plan: SplitPlan | None = None,
    season: int | None = None,
) -> Fitted:
    """Split chronologically (``plan``, default the ETT protocol), train, evaluate and
    build the artifact and its metadata. ``season`` (readings) overrides the detected
    one; the TFT's feature windows span it."""
    return fit_prepared(prepare(kind, series, config, plan=plan, season=season), progress)


def fit_prepared(prepared: Prepared, progress: Progress | None = None) -> Fitted:
    """Train what :func:`prepare` set up; score it and describe it for the registry."""
    kind, series, config, plan, when, split = (
        prepared.kind,
        prepared.series,
        prepared.config,
        prepared.plan,
        prepared.timing,
        prepared.split,
    )
    if kind == "lstm":
        result = train_lstm(split, config, progress)
        artifact = {
            "kind": "linear-lstm",
            "config": asdict(config),
            "state_dict": result.net.state_dict(),
            "quantiles": torch.as_tensor(result.quantiles),
        }
        extra: dict = {}
    else:
        result = train_tft(split, config, progress)
        artifact = {"kind": "tft", "config": asdict(config), "state_dict": result.net.state_dict()}
        extra = {"importances": result.importances}
    baseline = _seasonal_naive(series, split, config.horizon, when.season, result)
    train_rows, valid_rows, _ = split.rows
    windows = split.origins(config.horizon)
    last = result.history[-1]["epoch"] if result.history else 0
    meta = {
        "kind": artifact["kind"],
        "params": asdict(config),
        "data": {
            "file": series.name,
            "sha256": series.fingerprint,
            "rows": sum(split.rows),
            "file_rows": len(series.values),
            "channels": series.columns,
            "targets": series.columns,
            "covariates": list(series.covariate_columns),
            "step_seconds": when.step_seconds,
            "season": when.season,
            "timing": when.as_dict(),
        },
        "split": {
            **split.describe(),
            "fractions": list(plan.fractions) if plan.protocol == "fractions" else None,
            "windows": dict(zip(("train", "valid", "test"), windows, strict=True)),
            "test_from": float(series.ts[train_rows + valid_rows]),
        },
        "warm_up": warm_up_readings(kind, config.lookback, when.season),
        "metrics": {"valid": result.valid.as_dict(), "test": result.test.as_dict()},
        "metrics_by_target": {
            part: {
                column: scored.as_dict()
                for column, scored in zip(
                    series.columns, result.assessed[part].channels, strict=True
                )
            }
            for part in ("valid", "test")
        },
        "baseline": baseline,
        "best_epoch": result.best_epoch,
        "epochs_run": last,
        "stopped_early": result.stopped_early,
        "history": result.history,
        "train_seconds": round(result.seconds, 2),
        **extra,
    }
    return Fitted(kind, config, split, result, artifact, meta, when, baseline)


def _seasonal_naive(
    series: Series, split: Split, horizon: int, season: int, result: TrainResult | TFTResult
) -> dict | None:
    """The streaming baseline's rule (step h repeats the value one season before it) on
    the model's test origins, on the same scale: overall, per target and at how many
    steps the model's MSE is lower. None when the rows before the test part hold less
    than a season."""
    train, valid, test = split.rows
    first = train + valid - 1  # the first test origin: its targets are the test rows
    origins = first + np.arange(test - horizon + 1)
    if first - season + 1 < 0 or not len(origins):
        return None
    scaled = (series.values[: train + valid + test] - split.mean) / split.std
    steps = np.arange(horizon)
    yhat = scaled[(origins[:, None] - season + 1 + steps % season)]  # (N, H, C)
    actual = scaled[origins[:, None] + 1 + steps]
    error = yhat - actual
    by_target = {column: _scores(error[..., c]) for c, column in enumerate(series.columns)}
    step_mse = (error**2).mean((0, 2))
    model_steps = result.assessed["test"].step_mse
    beaten = int((model_steps < step_mse).sum())
    return {
        "rule": "seasonal_naive",
        "season": season,
        "test": _scores(error),
        "test_by_target": by_target,
        "steps_beaten": beaten,
        "steps": horizon,
    }


def _scores(error: np.ndarray) -> dict:
    return {"mse": round(float((error**2).mean()), 6), "mae": round(float(np.abs(error).mean()), 6)}

"""Train a model of either kind on a series and describe it for the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import torch

from forecast.errors import ConfigError
from models.data import Series, Split, protocol_split
from models.tft import WARM_UP, TFTConfig, TFTResult, train_tft
from models.train import TrainConfig, TrainResult, train_lstm

KINDS = ("lstm", "tft")
Progress = Callable[[int, dict], None]


@dataclass
class Fitted:
    kind: str
    config: TrainConfig | TFTConfig
    split: Split
    result: TrainResult | TFTResult
    artifact: dict
    meta: dict


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


def fit(
    kind: str, series: Series, config: TrainConfig | TFTConfig, progress: Progress | None = None
) -> Fitted:
    """Split chronologically, train, evaluate and build the artifact and its metadata."""
    if kind == "lstm":
        split = protocol_split(series, config.lookback)
        result = train_lstm(split, config, progress)
        artifact = {
            "kind": "linear-lstm",
            "config": asdict(config),
            "state_dict": result.net.state_dict(),
            "quantiles": torch.as_tensor(result.quantiles),
        }
        extra: dict = {}
    else:
        split = protocol_split(series, config.lookback + WARM_UP)
        result = train_tft(split, config, progress)
        artifact = {"kind": "tft", "config": asdict(config), "state_dict": result.net.state_dict()}
        extra = {"importances": result.importances}
    meta = {
        "kind": artifact["kind"],
        "params": asdict(config),
        "data": {
            "file": series.name,
            "sha256": series.fingerprint,
            "rows": len(series.values),
            "channels": series.columns,
            "step_seconds": series.step_seconds,
        },
        "metrics": {"valid": result.valid.as_dict(), "test": result.test.as_dict()},
        "best_epoch": result.best_epoch,
        "history": result.history,
        "train_seconds": round(result.seconds, 2),
        **extra,
    }
    return Fitted(kind, config, split, result, artifact, meta)

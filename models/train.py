"""Training and evaluation of the LSTM on a chronological split (pure computation, no
registry)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from models.data import Split, windows
from models.lstm import LinearLSTMNet

Progress = Callable[[int, dict], None]


@dataclass
class TrainConfig:
    lookback: int = 336
    horizon: int = 96
    hidden: int = 64
    epochs: int = 10
    patience: int = 3
    lr: float = 1e-3
    linear_lr: float = 1e-5
    ridge_lambda: float = 100.0
    chunk: int = 128
    seed: int = 0
    coverage: float = 0.9


@dataclass
class Metrics:
    mse: float
    mae: float
    mape: float
    coverage: float | None = None

    def as_dict(self) -> dict:
        return {k: round(v, 6) for k, v in vars(self).items() if v is not None}


@dataclass
class Assessment:
    """Scores of one segment: overall, per channel (in column order) and the MSE of each
    forecast step over every channel and window (H,)."""

    overall: Metrics
    channels: list[Metrics]
    step_mse: np.ndarray


@dataclass
class TrainResult:
    net: LinearLSTMNet
    quantiles: np.ndarray
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    valid: Metrics | None = None
    test: Metrics | None = None
    seconds: float = 0.0
    stopped_early: bool = False  # ``patience`` epochs passed without improvement
    assessed: dict[str, Assessment] = field(default_factory=dict)  # "valid", "test"


def ridge(values: np.ndarray, lookback: int, horizon: int, lam: float) -> np.ndarray:
    """Closed-form ridge on mean-removed windows of all channels (shared weights)."""
    x, y = windows(values, lookback, horizon)
    mean = x.mean(1, keepdims=True)
    xc, yc = x - mean, y - mean
    return np.linalg.solve(xc.T @ xc + lam * np.eye(lookback), xc.T @ yc)


def offline_forecasts(
    net: LinearLSTMNet, values: np.ndarray, ts: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forecasts for every stride-1 window of a segment (fresh LSTM state at its start):
    (C, N, H) forecasts, (C, N) window std and (C, N, H) targets."""
    series = torch.as_tensor(values.T, dtype=torch.float32)
    n = series.shape[1] - net.lookback - net.horizon + 1
    with torch.inference_mode():
        yhat, std, _ = net.segment(series, ts)
    targets = series.unfold(1, net.horizon, 1)[:, net.lookback : net.lookback + n]
    return yhat[:, :n], std[:, :n], targets


def evaluate(
    net: LinearLSTMNet, segment: tuple[np.ndarray, np.ndarray], quantiles: np.ndarray | None = None
) -> Metrics:
    yhat, std, targets = offline_forecasts(net, *segment)
    return _metrics(yhat, std, targets, quantiles)


def assess(
    net: LinearLSTMNet, segment: tuple[np.ndarray, np.ndarray], quantiles: np.ndarray | None = None
) -> Assessment:
    """:func:`evaluate` overall (the same numbers), per channel and per step."""
    yhat, std, targets = offline_forecasts(net, *segment)
    per_channel = [
        _metrics(yhat[c : c + 1], std[c : c + 1], targets[c : c + 1], quantiles)
        for c in range(yhat.shape[0])
    ]
    step_mse = ((yhat - targets) ** 2).mean((0, 1)).double().numpy()
    return Assessment(_metrics(yhat, std, targets, quantiles), per_channel, step_mse)


def _metrics(
    yhat: torch.Tensor, std: torch.Tensor, targets: torch.Tensor, quantiles: np.ndarray | None
) -> Metrics:
    error = yhat - targets
    coverage = None
    if quantiles is not None:
        half = std.unsqueeze(-1) * torch.as_tensor(quantiles, dtype=torch.float32)
        coverage = float((error.abs() <= half).float().mean())
    mape = float((error.abs() / targets.abs().clamp_min(1e-2)).mean())
    return Metrics(float((error**2).mean()), float(error.abs().mean()), mape, coverage)


def conformal_quantiles(
    net: LinearLSTMNet, segment: tuple[np.ndarray, np.ndarray], coverage: float
) -> np.ndarray:
    """Per-step quantile of |error| / window std on a calibration segment."""
    yhat, std, targets = offline_forecasts(net, *segment)
    scores = ((yhat - targets).abs() / std.unsqueeze(-1)).reshape(-1, net.horizon)
    n = scores.shape[0]
    level = min(1.0, np.ceil((n + 1) * coverage) / n)
    return torch.quantile(scores, level, dim=0).numpy()


def train_lstm(split: Split, config: TrainConfig, progress: Progress | None = None) -> TrainResult:
    """Fit ridge, then the LSTM residual with truncated BPTT and early stopping."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    values, ts = split.train
    weights = ridge(values, config.lookback, config.horizon, config.ridge_lambda)
    net = LinearLSTMNet(config.lookback, config.horizon, config.hidden, weights)
    optimiser = torch.optim.Adam(
        [
            {"params": [*net.lstm.parameters(), *net.head.parameters()], "lr": config.lr},
            {"params": [net.linear], "lr": config.linear_lr},
        ]
    )
    series = torch.as_tensor(values.T, dtype=torch.float32)
    n = series.shape[1] - config.lookback - config.horizon + 1
    targets = series.unfold(1, config.horizon, 1)[:, config.lookback : config.lookback + n]
    best = evaluate(net, split.valid).mse
    best_state, best_epoch, waited, stopped = copy.deepcopy(net.state_dict()), 0, 0, False
    history = [{"epoch": 0, "valid_mse": round(best, 6)}]
    if progress:
        progress(0, history[-1])
    for epoch in range(1, config.epochs + 1):
        net.train()
        state, losses = None, []
        for start in range(0, n, config.chunk):
            stop = min(start + config.chunk, n)
            # The segment spans the chunk's windows: rows start .. stop + lookback - 1.
            part = series[:, start : stop + config.lookback - 1]
            yhat, _, state = net.segment(part, ts[start : stop + config.lookback - 1], state)
            state = tuple(s.detach() for s in state)
            loss = ((yhat - targets[:, start:stop]) ** 2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        net.eval()
        valid = evaluate(net, split.valid).mse
        history.append(
            {
                "epoch": epoch,
                "train_mse": round(float(np.mean(losses)), 6),
                "valid_mse": round(valid, 6),
            }
        )
        if progress:
            progress(epoch, history[-1])
        if valid < best:
            best, best_state, best_epoch, waited = valid, copy.deepcopy(net.state_dict()), epoch, 0
        else:
            waited += 1
            if waited >= config.patience:
                stopped = True
                break
    net.load_state_dict(best_state)
    net.eval()
    quantiles = conformal_quantiles(net, split.valid, config.coverage)
    result = TrainResult(net, quantiles, best_epoch, history, stopped_early=stopped)
    result.assessed = {
        "valid": assess(net, split.valid, quantiles),
        "test": assess(net, split.test, quantiles),
    }
    result.valid, result.test = result.assessed["valid"].overall, result.assessed["test"].overall
    result.seconds = time.perf_counter() - started
    return result

"""``forecast bench online``: a test split replayed in time order under delayed feedback,
scored with and without online adaptation (:mod:`models.online`).

The LSTM is the one the other benchmarks serve (:func:`bench.serving.trained_lstm`:
trained under the ETT protocol, cached); its split is :func:`models.fit.prepare`'s. The
base model does not change, so its forecasts for every origin come from one batched
pass; the replay then walks the segment reading by reading: each reading first matures
the pending forecasts whose target it is (:class:`models.online.Pending`), the adapter
learns from those pairs, and only then is the next forecast issued and corrected. The
targets are used for nothing but the final scores, on the protocol's scaled values.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.serving import DEFAULT_CACHE, LstmPlan, trained_lstm
from models.data import load_wide_csv
from models.fit import configure, prepare
from models.lstm import LinearLSTMNet
from models.online import OnlineAdapter, OnlineConfig, Pending
from models.train import offline_forecasts

Say = Callable[[str], None]


@dataclass(frozen=True)
class OnlinePlan:
    """What to replay: a data set, the LSTM serving it, the split part, how many origins."""

    data: Path
    epochs: int = 10
    cache: Path = DEFAULT_CACHE
    lookback: int = 336
    horizon: int = 96
    hidden: int = 64
    part: str = "test"  # or "valid" (to choose the rates without looking at test)
    origins: int | None = None  # the first N origins only (None: all)

    def lstm(self) -> LstmPlan:
        return LstmPlan(
            self.data,
            self.epochs,
            self.cache,
            lookback=self.lookback,
            horizon=self.horizon,
            hidden=self.hidden,
        )


@dataclass(frozen=True)
class Scores:
    mse: float
    mae: float
    coverage: float
    width: float  # mean interval width, in scaled units


@dataclass(frozen=True)
class Report:
    name: str
    channels: int
    origins: int
    static: Scores
    online: Scores
    seconds: float


@dataclass(frozen=True)
class Raw:
    """The model's forecasts for every origin of a segment: (C, N, H) point, lower and
    upper; the segment's readings (T, C); the row of the first origin; targets (C, N, H),
    for scoring only."""

    point: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    readings: np.ndarray
    first: int
    targets: np.ndarray


def raw_forecasts(plan: OnlinePlan, say: Say) -> tuple[str, Raw]:
    """The trained (or cached) LSTM's forecasts over the plan's segment, in one pass."""
    artifact, _ = trained_lstm(plan.lstm(), say)
    config = configure("lstm", **plan.lstm().options())
    series = load_wide_csv(plan.data)
    segment = getattr(prepare("lstm", series, config).split, plan.part)
    net = LinearLSTMNet(plan.lookback, plan.horizon, plan.hidden)
    net.load_state_dict(artifact["state_dict"])
    point, std, targets = offline_forecasts(net.eval(), *segment)
    n = point.shape[1] if plan.origins is None else min(plan.origins, point.shape[1])
    half = std[:, :n, None] * artifact["quantiles"].float()
    point, targets = point[:, :n].numpy(), targets[:, :n].numpy()
    readings = segment[0][: plan.lookback + n + plan.horizon - 1]
    raw = Raw(
        point, point - half.numpy(), point + half.numpy(), readings, plan.lookback - 1, targets
    )
    return series.name, raw


def replay(raw: Raw, config: OnlineConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Corrected (C, N, H) point, lower, upper: reading by reading, each forecast
    corrected by what matured before it was issued."""
    channels, origins, _ = raw.point.shape
    rows = np.arange(channels)
    adapter, pending = OnlineAdapter(config, channels), Pending(config.horizon, channels)
    point, lower, upper = (np.empty_like(raw.point) for _ in range(3))
    pending.clock[:] = raw.first - 1  # the readings before the first origin: none pending
    for row in range(raw.first, len(raw.readings)):
        adapter.update(*pending.arrive(rows, raw.readings[row]))
        origin = row - raw.first
        if origin < origins:
            model = raw.point[:, origin], raw.lower[:, origin], raw.upper[:, origin]
            point[:, origin], lower[:, origin], upper[:, origin] = adapter.apply(rows, *model)
            pending.issue(rows, model[0], lower[:, origin], upper[:, origin])
    return point, lower, upper


def scores(point: np.ndarray, lower: np.ndarray, upper: np.ndarray, targets: np.ndarray) -> Scores:
    error = point - targets
    covered = (targets >= lower) & (targets <= upper)
    return Scores(
        float((error**2).mean()),
        float(np.abs(error).mean()),
        float(covered.mean()),
        float((upper - lower).mean()),
    )


def run(plan: OnlinePlan, config: OnlineConfig, say: Say) -> Report:
    """Replay the plan's segment with and without adaptation; the two sets of scores."""
    name, raw = raw_forecasts(plan, say)
    channels, origins, _ = raw.point.shape
    say(f"{name}: replaying {origins} origins x {channels} channels ({plan.part})")
    started = time.perf_counter()
    online = scores(*replay(raw, replace(config, horizon=plan.horizon)), raw.targets)
    took = time.perf_counter() - started
    static = scores(raw.point, raw.lower, raw.upper, raw.targets)
    return Report(name, channels, origins, static, online, took)


def table(reports: list[Report], config: OnlineConfig) -> list[str]:
    """The printed table: per data set, the model alone and with online adaptation."""
    lines = [
        f"{'data set':<12}{'':<10}{'MSE':>8}{'MAE':>8}{'cover':>8}{'width':>8}{'origins':>9}",
    ]
    for report in reports:
        for label, scored in (("static", report.static), ("online", report.online)):
            lines.append(
                f"{report.name:<12}{label:<10}{scored.mse:>8.4f}{scored.mae:>8.4f}"
                f"{scored.coverage:>8.3f}{scored.width:>8.3f}{report.origins:>9}"
            )
        lines.append(
            f"{report.name:<12}{'change':<10}{report.online.mse / report.static.mse - 1:>+8.1%}"
            f"{report.online.mae / report.static.mae - 1:>+8.1%}"
            f"{'':>16}{report.seconds:>8.1f}s"
        )
    lines.append(
        f"nominal coverage {config.coverage:g}; interval rate {config.interval_rate:g}, bias "
        f"rate {config.bias_rate:g}, error clip {config.error_clip:g}, max bias "
        f"{config.max_bias:g}, width x{config.min_width:g}..x{config.max_width:g}"
    )
    return lines


def command_line(plans: list[OnlinePlan], config: OnlineConfig, cache_given: bool) -> str:
    """The ``forecast bench online`` command that reproduces a run."""
    plan = plans[0]
    args = [f"--dataset {p.data}" for p in plans]
    args += [f"--horizon {plan.horizon} --lookback {plan.lookback} --hidden {plan.hidden}"]
    args += [f"--train-epochs {plan.epochs} --part {plan.part}"]
    args += [f"--origins {plan.origins}"] if plan.origins else []
    args += [f"--model-cache {plan.cache}"] if cache_given else []
    args += [
        f"--coverage {config.coverage:g} --interval-rate {config.interval_rate:g} --bias-rate "
        f"{config.bias_rate:g} --error-clip {config.error_clip:g} --max-bias "
        f"{config.max_bias:g} --width-bounds {config.min_width:g} {config.max_width:g}"
    ]
    return "forecast bench online " + " ".join(args)

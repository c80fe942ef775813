"""Temporal Fusion Transformer (pytorch-forecasting) over the online features.

Inputs per reading, built from the online features of :mod:`models.features`, all free
of the sensor's unit so that one model serves any sensor:

* unknown: the value (normalised per encoder window by the dataset's
  ``EncoderNormalizer``), ``level_z = (x - mean_s) / std_s``,
  ``ewm_gap = (x - ewm_0.1) / std_s`` and ``season_z = diff_s / std_s``, where ``s`` is
  the season in readings (``TFTConfig.season``, one day of readings of the training
  data: 24 for hourly data, whose features are ``mean_24``, ``std_24``, ``diff_24``);
* known: hour of day and day of week as sine/cosine, also for the forecast steps.

Training uses the library's ``TimeSeriesDataSet``. Serving builds the network's input
tensors directly from per-sensor state (the last ``lookback`` input rows) and calls the
network once per micro-batch; a test checks it against ``model.predict``. The 5%, 50% and
95% quantiles become ``lower``, ``yhat`` and ``upper``. A sensor is forecast every
``cadence`` readings once ``lookback + season`` readings have been seen.
"""

from __future__ import annotations

import copy
import logging
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from models.base import NOT_DUE, Interval, Item, NotDue
from models.data import Split, calendar
from models.features import CALENDAR, FeatureSpec, OnlineFeatures, batch_features
from models.train import Assessment, Metrics

UNKNOWN = ("value", "level_z", "ewm_gap", "season_z")
KNOWN = CALENDAR
QUANTILES = (0.05, 0.5, 0.95)
SEASON = 24  # the default: one day of hourly readings


def feature_spec(season: int = SEASON) -> FeatureSpec:
    """The online features the inputs are built from, for a season of readings."""
    return FeatureSpec.for_season(season, lags=(), diffs=(season,), ewm_alphas=(0.1,))


def warm_up(season: int = SEASON) -> int:
    """Readings before the first complete input row."""
    return feature_spec(season).memory


FEATURES = feature_spec()  # hourly data's
WARM_UP = warm_up()
EPS = 1e-3
QUIET = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}
Progress = Callable[[int, dict], None]


@dataclass
class TFTConfig:
    lookback: int = 96
    horizon: int = 24
    hidden: int = 16
    heads: int = 2
    dropout: float = 0.1
    epochs: int = 6
    patience: int = 2
    lr: float = 3e-3
    batch_size: int = 128
    batches_per_epoch: int = 200
    seed: int = 0
    cadence: int = 1
    season: int = SEASON  # readings; the feature windows span one season


@dataclass
class TFTResult:
    net: torch.nn.Module
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    valid: Metrics | None = None
    test: Metrics | None = None
    importances: dict = field(default_factory=dict)
    seconds: float = 0.0
    stopped_early: bool = False  # ``patience`` epochs passed without improvement
    assessed: dict[str, Assessment] = field(default_factory=dict)  # "valid", "test"


# -- inputs ----------------------------------------------------------------------------------


def input_rows(values: np.ndarray, features: np.ndarray, season: int = SEASON) -> np.ndarray:
    """Model inputs (N, 8) from values (N,) and their feature rows (N, F) of
    :func:`feature_spec` for ``season``; NaN in warm-up."""
    column = {name: i for i, name in enumerate(feature_spec(season).names)}
    std = features[:, column[f"std_{season}"]] + EPS
    unknown = [
        values,
        (values - features[:, column[f"mean_{season}"]]) / std,
        (values - features[:, column["ewm_0.1"]]) / std,
        features[:, column[f"diff_{season}"]] / std,
    ]
    known = [features[:, column[name]] for name in KNOWN]
    return np.stack(unknown + known, axis=-1)


def _series_rows(values: np.ndarray, ts: np.ndarray, season: int) -> np.ndarray:
    """Input rows of one channel, the warm-up included."""
    spec = feature_spec(season)
    return input_rows(values, batch_features(values, ts, spec).to_numpy(), season)


def long_frame(
    values: np.ndarray, ts: np.ndarray, channels: list[str], season: int = SEASON
) -> pd.DataFrame:
    """The dataset's long table: one row per channel and reading after the warm-up."""
    parts = []
    for c, channel in enumerate(channels):
        rows = _series_rows(values[:, c], ts, season)
        frame = pd.DataFrame(rows[warm_up(season) :], columns=[*UNKNOWN, *KNOWN])
        frame.insert(0, "time_idx", np.arange(len(frame)))
        frame.insert(0, "series", channel)
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def dataset(frame: pd.DataFrame, config: TFTConfig):
    """Every stride-1 window of ``lookback`` inputs followed by ``horizon`` targets."""
    from pytorch_forecasting import TimeSeriesDataSet
    from pytorch_forecasting.data import EncoderNormalizer

    return TimeSeriesDataSet(
        frame,
        time_idx="time_idx",
        target="value",
        group_ids=["series"],
        min_encoder_length=config.lookback,
        max_encoder_length=config.lookback,
        min_prediction_length=config.horizon,
        max_prediction_length=config.horizon,
        time_varying_known_reals=list(KNOWN),
        time_varying_unknown_reals=list(UNKNOWN),
        target_normalizer=EncoderNormalizer(method="standard"),
        scalers={name: None for name in (*KNOWN, *UNKNOWN[1:])},  # already unit-free
        add_relative_time_idx=False,
        add_target_scales=False,
        add_encoder_length=False,
    )


def build_network(config: TFTConfig) -> torch.nn.Module:
    """A fresh network; its shape depends only on the configuration."""
    from pytorch_forecasting import TemporalFusionTransformer
    from pytorch_forecasting.metrics import QuantileLoss

    length = config.lookback + config.horizon
    blank = pd.DataFrame(
        {
            "series": "blank",
            "time_idx": np.arange(length),
            **{name: np.linspace(0, 1, length) for name in (*UNKNOWN, *KNOWN)},
        }
    )
    with _quiet():
        return TemporalFusionTransformer.from_dataset(
            dataset(blank, config),
            hidden_size=config.hidden,
            attention_head_size=config.heads,
            hidden_continuous_size=config.hidden,
            dropout=config.dropout,
            learning_rate=config.lr,
            loss=QuantileLoss(list(QUANTILES)),
        )


# -- inference ---------------------------------------------------------------------------


FORWARD_CHUNK = 512  # windows per network call: what bounds the activations' memory


@torch.inference_mode()
def forward(net: torch.nn.Module, encoder: np.ndarray, future_ts: np.ndarray) -> np.ndarray:
    """Quantile forecasts (B, H, 3) from input windows (B, L, 8) and the forecast steps'
    times (B, H), without any dataset: the tensors the network's ``forward`` reads. At
    most ``FORWARD_CHUNK`` windows go through the network at a time: 10,000 sensors due
    in one batch took a worker 2.4 GiB above its resident size in one call."""
    known = calendar(future_ts)
    if len(encoder) <= FORWARD_CHUNK:
        return forward_known(net, encoder, known)
    return np.concatenate(
        [
            forward_known(net, encoder[i : i + FORWARD_CHUNK], known[i : i + FORWARD_CHUNK])
            for i in range(0, len(encoder), FORWARD_CHUNK)
        ]
    )


@torch.inference_mode()
def forward_known(net: torch.nn.Module, encoder: np.ndarray, known: np.ndarray) -> np.ndarray:
    """:func:`forward` with the forecast steps' known inputs given (B, H, 4) in
    :data:`KNOWN` order (a what-if may override them) rather than computed from times."""
    device = next(net.parameters()).device
    batch, lookback, _ = encoder.shape
    horizon = known.shape[1]
    window = torch.tensor(encoder, dtype=torch.float32, device=device)
    target = window[..., 0]
    center = target.mean(-1)
    scale = target.std(-1) + torch.finfo(torch.float32).eps  # as EncoderNormalizer
    named = {name: window[..., i] for i, name in enumerate((*UNKNOWN, *KNOWN))}
    named["value"] = (target - center.unsqueeze(-1)) / scale.unsqueeze(-1)
    future = torch.as_tensor(known, dtype=torch.float32, device=device)
    known_future = {name: future[..., i] for i, name in enumerate(KNOWN)}
    zeros = torch.zeros(batch, horizon, device=device)
    reals = net.hparams.x_reals
    x = {
        "encoder_cont": torch.stack([named[name] for name in reals], -1),
        "decoder_cont": torch.stack([known_future.get(name, zeros) for name in reals], -1),
        "encoder_cat": torch.zeros(batch, lookback, 0, dtype=torch.long, device=device),
        "decoder_cat": torch.zeros(batch, horizon, 0, dtype=torch.long, device=device),
        "encoder_lengths": torch.full((batch,), lookback, device=device),
        "decoder_lengths": torch.full((batch,), horizon, device=device),
        "target_scale": torch.stack([center, scale], -1),
    }
    return net(x)["prediction"].cpu().numpy()


def offline_windows(
    values: np.ndarray, ts: np.ndarray, lookback: int, horizon: int, season: int = SEASON
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every complete window of one channel: inputs (N, L, 8), future times (N, H) and
    targets (N, H)."""
    skip = warm_up(season)
    rows = _series_rows(values, ts, season)[skip:]
    shifted_ts, shifted = ts[skip:], values[skip:]
    n = len(rows) - lookback - horizon + 1
    encoder = np.lib.stride_tricks.sliding_window_view(rows, lookback, axis=0)[:n]
    encoder = encoder.transpose(0, 2, 1)
    future = np.lib.stride_tricks.sliding_window_view(shifted_ts[lookback:], horizon)[:n]
    targets = np.lib.stride_tricks.sliding_window_view(shifted[lookback:], horizon)[:n]
    return encoder, future, targets


def evaluate(
    net: torch.nn.Module,
    segment: tuple[np.ndarray, np.ndarray],
    config: TFTConfig,
    chunk: int = FORWARD_CHUNK,
) -> Metrics:
    """Scaled errors and 90% interval coverage over every window of every channel."""
    return assess(net, segment, config, chunk).overall


def assess(
    net: torch.nn.Module,
    segment: tuple[np.ndarray, np.ndarray],
    config: TFTConfig,
    chunk: int = FORWARD_CHUNK,
) -> Assessment:
    """:func:`evaluate` overall, per channel and per forecast step."""
    values, ts = segment
    errors, covered, pct, channels = [], [], [], []
    for c in range(values.shape[1]):
        encoder, future, targets = offline_windows(
            values[:, c], ts, config.lookback, config.horizon, config.season
        )
        first = len(errors)
        for start in range(0, len(encoder), chunk):
            q = forward(net, encoder[start : start + chunk], future[start : start + chunk])
            y = targets[start : start + chunk]
            errors.append(q[..., 1] - y)
            covered.append((q[..., 0] <= y) & (y <= q[..., 2]))
            pct.append(np.abs(q[..., 1] - y) / np.maximum(np.abs(y), 1e-2))
        channels.append(_metrics(errors[first:], covered[first:], pct[first:]))
    error = np.concatenate(errors)
    return Assessment(
        _metrics(errors, covered, pct), channels, (error**2).mean(0).astype(np.float64)
    )


def _metrics(errors: list, covered: list, pct: list) -> Metrics:
    error = np.concatenate(errors)
    return Metrics(
        float((error**2).mean()),
        float(np.abs(error).mean()),
        float(np.concatenate(pct).mean()),
        float(np.concatenate(covered).mean()),
    )


def variable_importances(net: torch.nn.Module, loader) -> dict:
    """Mean attention of the variable selection networks, each side summing to 1."""
    sums: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for x, _ in loader:
            interpretation = net.interpret_output(net(x), reduction="sum")
            for side in ("encoder_variables", "decoder_variables"):
                sums[side] = sums.get(side, 0) + interpretation[side]
    out = {}
    for side, names in (
        ("encoder", net.encoder_variables),
        ("decoder", net.decoder_variables),
    ):
        weights = sums[f"{side}_variables"]
        weights = weights / weights.sum()
        out[side] = {n: round(float(w), 4) for n, w in zip(names, weights, strict=True)}
    return out


# -- training ----------------------------------------------------------------------------


def train_tft(split: Split, config: TFTConfig, progress: Progress | None = None) -> TFTResult:
    """Fit on the training segment with early stopping on the validation loss, keeping
    the best epoch's weights. ``split`` must start its segments ``lookback +
    warm_up(config.season)`` rows early."""
    import lightning.pytorch as pl

    started = time.perf_counter()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banners
    _seed(config.seed)
    channels = [f"c{i}" for i in range(split.train[0].shape[1])]
    train_set = dataset(long_frame(*split.train, channels, config.season), config)
    valid_frame = long_frame(*split.valid, channels, config.season)
    valid_set = train_set.from_dataset(train_set, valid_frame, stop_randomization=True)
    net = build_network(config)
    train_loader = train_set.to_dataloader(train=True, batch_size=config.batch_size)
    valid_loader = valid_set.to_dataloader(train=False, batch_size=config.batch_size * 4)
    keeper = _best_epoch(config.patience, progress)
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        accelerator="cpu",
        gradient_clip_val=0.1,
        limit_train_batches=config.batches_per_epoch,
        callbacks=[keeper],
        num_sanity_val_steps=0,
        deterministic=True,
        **QUIET,
    )
    with _quiet():
        trainer.fit(net, train_loader, valid_loader)
    net.load_state_dict(keeper.best_state)
    net.eval()
    result = TFTResult(net, keeper.best_epoch, keeper.history, stopped_early=keeper.stopped)
    result.assessed = {
        "valid": assess(net, split.valid, config),
        "test": assess(net, split.test, config),
    }
    result.valid, result.test = result.assessed["valid"].overall, result.assessed["test"].overall
    sample = valid_set.to_dataloader(train=False, batch_size=256)
    result.importances = variable_importances(net, _first(sample, 4))
    result.seconds = time.perf_counter() - started
    return result


def _best_epoch(patience: int, progress: Progress | None):
    """A Lightning callback that tracks the validation loss, keeps the best epoch's
    weights and stops after ``patience`` epochs without improvement."""
    import lightning.pytorch as pl

    class BestEpoch(pl.Callback):
        def __init__(self) -> None:
            self.best, self.best_epoch, self.waited = float("inf"), 0, 0
            self.stopped = False
            self.best_state: dict = {}
            self.history: list[dict] = []

        def on_validation_epoch_end(self, trainer, module) -> None:
            loss = float(trainer.callback_metrics["val_loss"])
            epoch = trainer.current_epoch + 1
            row = {"epoch": epoch, "valid_loss": round(loss, 6)}
            self.history.append(row)
            if progress:
                progress(epoch, row)
            if loss < self.best:
                self.best, self.best_epoch, self.waited = loss, epoch, 0
                self.best_state = copy.deepcopy(module.state_dict())
            else:
                self.waited += 1
                if self.waited >= patience:
                    trainer.should_stop = self.stopped = True

    return BestEpoch()


def _first(loader, batches: int):
    for i, batch in enumerate(loader):
        if i == batches:
            return
        yield batch


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _quiet(warnings.catch_warnings):
    """The two library warnings that are expected (see the design notes)."""

    def __enter__(self):
        super().__enter__()
        warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        return self


# -- streaming ---------------------------------------------------------------------------


class TFTForecaster:
    """Per-sensor state: the live features, the last ``lookback`` input rows, the reading
    count since the last forecast and the latest time and step."""

    name = "tft"

    def __init__(
        self, net: torch.nn.Module, version: int, config: TFTConfig, device: str = "cpu"
    ) -> None:
        self.net = net.to(device).eval()
        self.version = version
        self.horizon = config.horizon
        self.lookback = config.lookback
        self.cadence = config.cadence
        self.season = config.season
        self.features = OnlineFeatures(feature_spec(config.season))

    def init_state(self) -> dict:
        # "since" counts readings since the last forecast: the first full window is due.
        since = self.cadence - 1
        return {"features": self.features.init_state(), "rows": [], "since": since, "ts": None}

    def correct(self, state: dict, value: float, newer: int, replace: bool) -> None:
        """The feature windows take the late value; input rows already built stay."""
        live = self.features.restore(state["features"])
        state["features"] = live.corrected(value, newer, replace)

    def step(self, items: list[Item]) -> list[Interval | NotDue | None]:
        results: list = [None] * len(items)
        due, windows, future = [], [], []
        for index, (state, value, ts) in enumerate(items):
            live = state["features"] = self.features.restore(state["features"])
            row = self.features.update(live, value, ts)
            step, state["ts"] = ts - (state["ts"] or ts), ts
            if not np.isfinite(row).all():
                continue  # warming up
            new = input_rows(np.array([value]), np.array([row]), self.season)
            new = new.astype(np.float32)
            old = np.asarray(state["rows"], dtype=np.float32).reshape(-1, new.shape[1])
            # A new float32 array each time (4 bytes a value; a window queued for this
            # batch's forward pass is never changed under it).
            keep = old[max(0, len(old) - self.lookback + 1) :]
            rows = state["rows"] = np.concatenate([keep, new])
            if len(rows) < self.lookback:
                continue
            state["since"] += 1
            if state["since"] < self.cadence:
                results[index] = NOT_DUE
                continue
            state["since"] = 0
            due.append(index)
            windows.append(rows)
            future.append(ts + step * np.arange(1, self.horizon + 1))
        if due:
            quantiles = forward(self.net, np.stack(windows), np.stack(future))
            low = np.minimum(quantiles[..., 0], quantiles[..., 1])
            high = np.maximum(quantiles[..., 2], quantiles[..., 1])
            for j, index in enumerate(due):
                results[index] = (quantiles[j, :, 1].tolist(), low[j].tolist(), high[j].tolist())
        return results


def from_artifact(artifact: dict, version: int, device: str) -> TFTForecaster:
    config = TFTConfig(**artifact["config"])
    net = build_network(config)
    net.load_state_dict(artifact["state_dict"])
    return TFTForecaster(net, version, config, device)

"""Wide CSV series and the published long-horizon protocol (ETT README).

Chronological split of 12/4/4 months of 30 days (8640/2880/2880 hourly rows); validation
and test segments start ``lookback`` rows early; per-channel standard scaling fitted on
the training rows; windows advance one step; errors on scaled values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from forecast.errors import ConfigError

TRAIN, VALID, TEST = 8640, 2880, 2880


@dataclass(frozen=True)
class Series:
    """A wide table: ``values`` (T, C) in original units, ``ts`` epoch seconds (T,)."""

    name: str
    columns: list[str]
    ts: np.ndarray
    values: np.ndarray
    fingerprint: str

    @property
    def step_seconds(self) -> float:
        return float(np.median(np.diff(self.ts)))


@dataclass(frozen=True)
class Split:
    """Scaled segments of the protocol; each is (values (T, C), ts (T,))."""

    mean: np.ndarray
    std: np.ndarray
    train: tuple[np.ndarray, np.ndarray]
    valid: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def load_wide_csv(path: Path) -> Series:
    """Read a wide CSV whose first column is the time; the other columns are channels."""
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if frame.shape[1] < 2:
        raise ConfigError(f"{path}: need a time column and at least one value column")
    stamps = pd.to_datetime(frame.iloc[:, 0], utc=True)
    # Seconds from the epoch, whatever resolution pandas picked for the column.
    ts = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    values = frame.iloc[:, 1:].to_numpy(np.float64)
    if not np.isfinite(values).all():
        raise ConfigError(f"{path}: missing or non-finite values")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return Series(Path(path).stem, [str(c) for c in frame.columns[1:]], ts, values, digest)


def protocol_split(series: Series, lookback: int) -> Split:
    """The published split; shorter files are cut 60/20/20 with the same rules."""
    total = len(series.values)
    if total >= TRAIN + VALID + TEST:
        train, valid, test = TRAIN, VALID, TEST
    else:
        train, valid = int(total * 0.6), int(total * 0.2)
        test = total - train - valid
    if train <= lookback or valid < 1 or test < 1:
        raise ConfigError(f"{series.name}: {total} rows are too few for lookback {lookback}")
    mean = series.values[:train].mean(0)
    std = series.values[:train].std(0)
    std[std == 0] = 1.0
    scaled = (series.values - mean) / std

    def part(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return scaled[start:stop], series.ts[start:stop]

    return Split(
        mean,
        std,
        part(0, train),
        part(train - lookback, train + valid),
        part(train + valid - lookback, train + valid + test),
    )


def windows(values: np.ndarray, lookback: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Stride-1 windows of every channel: inputs (N, lookback), targets (N, horizon)."""
    view = np.lib.stride_tricks.sliding_window_view(values, lookback + horizon, axis=0)
    return view[..., :lookback].reshape(-1, lookback), view[..., lookback:].reshape(-1, horizon)


def calendar(ts: np.ndarray) -> np.ndarray:
    """Hour-of-day and day-of-week as sine/cosine pairs: (..., 4)."""
    hour = (ts % 86_400) / 86_400 * 2 * np.pi
    day = ((ts // 86_400 + 3) % 7) / 7 * 2 * np.pi  # 1970-01-01 was a Thursday
    return np.stack([np.sin(hour), np.cos(hour), np.sin(day), np.cos(day)], axis=-1)

"""Wide CSV series, their timing, and their chronological splits.

A wide CSV has a time column first (RFC 3339, anything pandas parses, or epoch seconds),
then one column per channel. The channels forecast
(the *targets*) are every numeric column unless named; *covariates* are columns fed as
extra inputs to a model that can use them.

**Timing.** The step is the most common positive spacing of the times; longer spacings
are gaps (a sensor that sleeps at night or on weekends), never steps. The season is one
day of readings: ``86400 / step`` for data without gaps (24 hourly, 48 half-hourly, 288
five-minute), or the typical number of readings a day holds when whole parts of every
day are missing (169 for five-minute data from 07:00 to 21:00); a week of days for daily
data. Models count readings, not seconds, so a season counts readings too.

**Splits.** Chronological, by row, the latest rows last:

* :func:`fraction_split` cuts every row into train, validation and test fractions
  (default 0.7/0.1/0.2); ``forecast train`` uses it.
* :func:`protocol_split` is the published long-horizon protocol (ETT README): 12/4/4
  months of 30 days, 8640/2880/2880 hourly rows, used by ``forecast bench accuracy``.
  A longer file leaves its later rows out (the split counts them in ``unused``); a
  shorter one is cut 60/20/20 with the same rules.

In both, validation and test segments start ``context`` rows early (the model's lookback,
plus any feature warm-up), so their first forecast origin is the part's first row less
one; per-channel standard scaling is fitted on the training rows; windows advance one
step; errors are on scaled values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from forecast.errors import ConfigError
from models.timing import DAY, WEEKLY_STEP, daily_season, day_steps

TRAIN, VALID, TEST = 8640, 2880, 2880
FRACTIONS = (0.7, 0.1, 0.2)  # forecast train's default split
PROTOCOLS = ("fractions", "ett")


@dataclass(frozen=True)
class Series:
    """A wide table: ``values`` (T, C) in original units of the target ``columns``, ``ts``
    epoch seconds (T,); ``covariates`` (T, K) of ``covariate_columns`` if any were asked
    for; ``skipped`` the non-numeric columns that were left out."""

    name: str
    columns: list[str]
    ts: np.ndarray
    values: np.ndarray
    fingerprint: str
    covariate_columns: tuple[str, ...] = ()
    covariates: np.ndarray | None = None
    skipped: tuple[str, ...] = ()

    @property
    def step_seconds(self) -> float:
        return detect_step(self.ts)


@dataclass(frozen=True)
class Timing:
    """The step and season of a series, and its gaps (spacings longer than a step)."""

    step_seconds: float
    season: int
    day_steps: int  # steps in a day (a week for daily data) if nothing were missing
    gaps: int
    longest_gap: float  # seconds
    season_given: bool = False

    def as_dict(self) -> dict:
        return {
            "step_seconds": self.step_seconds,
            "season": self.season,
            "season_source": "given" if self.season_given else "detected",
            "day_steps": self.day_steps,
            "gaps": self.gaps,
            "longest_gap_seconds": self.longest_gap,
        }

    def describe(self) -> str:
        """Two clauses for a person: the step and its gaps; the season and its origin."""
        step = f"step {human_duration(self.step_seconds)} (the most common spacing"
        step += (
            f"; {self.gaps} gaps, the longest {human_duration(self.longest_gap)})"
            if self.gaps
            else ")"
        )
        what = "a week of days" if self.step_seconds >= WEEKLY_STEP else "one day of readings"
        if self.season_given:
            season = f"season {self.season} readings (--season)"
        elif self.season == self.day_steps:
            season = f"season {self.season} readings ({what})"
        else:
            season = (
                f"season {self.season} readings (one day of readings: a day holds "
                f"{self.season} of its {self.day_steps} steps)"
            )
        return f"{step}; {season}"


@dataclass(frozen=True)
class Split:
    """Scaled segments of a chronological split; each is (values (T, C), ts (T,)).

    ``rows`` are the rows each part owns (the targets of its forecasts); the validation
    and test segments also hold the ``context`` rows before them. ``unused`` rows at the
    end belong to no part (the ETT protocol on a longer file)."""

    mean: np.ndarray
    std: np.ndarray
    train: tuple[np.ndarray, np.ndarray]
    valid: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    rows: tuple[int, int, int] = (0, 0, 0)
    context: int = 0
    protocol: str = "ett"
    unused: int = 0

    def origins(self, horizon: int) -> tuple[int, int, int]:
        """Stride-1 forecast windows of each part for a model whose inputs span
        ``context`` rows: train, validation, test."""
        train, valid, test = self.rows
        return train - self.context - horizon + 1, valid - horizon + 1, test - horizon + 1

    def describe(self) -> dict:
        return {
            "protocol": self.protocol,
            "rows": dict(zip(("train", "valid", "test"), self.rows, strict=True)),
            "unused": self.unused,
            "context": self.context,
        }


@dataclass(frozen=True)
class SplitPlan:
    """How to split: ``fractions`` of every row, or the ``ett`` protocol."""

    protocol: str = "fractions"
    fractions: tuple[float, float, float] = FRACTIONS

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown split protocol {self.protocol!r}; one of {PROTOCOLS}")

    def apply(self, series: Series, context: int, horizon: int = 1) -> Split:
        if self.protocol == "ett":
            return protocol_split(series, context, horizon)
        return fraction_split(series, context, self.fractions, horizon)

    def describe(self) -> str:
        if self.protocol == "ett":
            return f"the ETT protocol ({TRAIN}/{VALID}/{TEST} rows)"
        return "fractions " + "/".join(f"{f:g}" for f in self.fractions) + " of every row"


# -- reading -----------------------------------------------------------------------------


def load_wide_csv(
    path: Path,
    targets: list[str] | tuple[str, ...] | None = None,
    covariates: list[str] | tuple[str, ...] | None = None,
) -> Series:
    """Read a wide CSV whose first column is the time. ``targets`` are the columns to
    forecast (default: every numeric column that is not a covariate)."""
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if frame.shape[1] < 2:
        raise ConfigError(f"{path}: need a time column and at least one value column")
    ts = _times(path, frame.iloc[:, 0])
    columns = [str(c) for c in frame.columns[1:]]
    frame.columns = [str(frame.columns[0]), *columns]
    numeric = [c for c in columns if pd.api.types.is_numeric_dtype(frame[c])]
    wanted_covariates = _chosen(path, frame, columns, numeric, covariates or (), "covariate")
    if targets:
        chosen = _chosen(path, frame, columns, numeric, targets, "target")
        both = sorted(set(chosen) & set(wanted_covariates))
        if both:
            raise ConfigError(
                f"{path}: {', '.join(both)}: a column is a target or a covariate, not both"
            )
    else:
        chosen = [c for c in numeric if c not in wanted_covariates]
        if not chosen:
            raise ConfigError(
                f"{path}: no numeric column to forecast; the columns are: {', '.join(columns)}"
            )
    values = _finite(path, frame, chosen)
    extra = _finite(path, frame, wanted_covariates) if wanted_covariates else None
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    skipped = tuple(c for c in columns if c not in numeric and c not in chosen)
    return Series(
        Path(path).stem, chosen, ts, values, digest, tuple(wanted_covariates), extra, skipped
    )


def _times(path: Path, column: pd.Series) -> np.ndarray:
    """Epoch seconds of the time column (RFC 3339 or anything pandas parses, or epoch
    seconds as numbers); they must increase."""
    try:
        if pd.api.types.is_numeric_dtype(column):  # epoch seconds
            stamps = pd.to_datetime(column, unit="s", utc=True)
        else:
            stamps = pd.to_datetime(column, utc=True)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(
            f"{path}: the first column ({column.name!r}) must hold times: {exc}"
        ) from exc
    if stamps.isna().any():
        row = int(np.flatnonzero(stamps.isna().to_numpy())[0])
        raise ConfigError(f"{path}: no time on line {row + 2} (column {column.name!r})")
    # Seconds from the epoch, whatever resolution pandas picked for the column.
    ts = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    bad = np.flatnonzero(np.diff(ts) <= 0)
    if len(bad):
        i = int(bad[0]) + 1
        raise ConfigError(
            f"{path}: times must increase, but line {i + 2} ({column.iloc[i]}) does not come "
            f"after line {i + 1} ({column.iloc[i - 1]}); sort the file and drop repeated times"
        )
    return ts


def _chosen(
    path: Path,
    frame: pd.DataFrame,
    columns: list[str],
    numeric: list[str],
    names: list[str] | tuple[str, ...],
    role: str,
) -> list[str]:
    """The named columns, checked: they exist, are numeric and are named once."""
    unknown = [n for n in names if n not in columns]
    if unknown:
        time_column = str(frame.columns[0])
        hint = f" ({time_column!r} is the time column)" if time_column in unknown else ""
        raise ConfigError(
            f"{path}: no {role} column {', '.join(map(repr, unknown))}{hint}; "
            f"the columns are: {', '.join(numeric) or '(none numeric)'}"
            + (
                f" (not numeric: {', '.join(c for c in columns if c not in numeric)})"
                if len(numeric) < len(columns)
                else ""
            )
        )
    text = [n for n in names if n not in numeric]
    if text:
        sample = frame[text[0]].dropna().astype(str).head(1).tolist()
        raise ConfigError(
            f"{path}: {role} column {text[0]!r} is not numeric"
            + (f" (it holds {sample[0]!r})" if sample else "")
        )
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ConfigError(f"{path}: {role} column {', '.join(repeated)} is named twice")
    return list(names)


def _finite(path: Path, frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    values = frame[columns].to_numpy(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        counts = bad.sum(0)
        worst = [f"{c} ({n})" for c, n in zip(columns, counts, strict=True) if n]
        row = int(np.flatnonzero(bad.any(1))[0])
        raise ConfigError(
            f"{path}: missing or non-finite values in {', '.join(worst)}, the first on line "
            f"{row + 2}; fill or drop them first"
        )
    return values


# -- timing ------------------------------------------------------------------------------


def detect_step(ts: np.ndarray) -> float:
    """The most common positive spacing, in seconds (the shorter on a tie)."""
    spacing = np.diff(np.asarray(ts, dtype=np.float64))
    spacing = spacing[spacing > 0]
    if not len(spacing):
        raise ConfigError("need at least two distinct times to find the step")
    steps, counts = np.unique(np.round(spacing, 3), return_counts=True)
    return float(steps[np.argmax(counts)])


def detect_season(ts: np.ndarray, step: float) -> int:
    """One day of readings (a week of days for daily or longer steps):
    :func:`models.timing.daily_season` of the file's typical whole day."""
    _, per_day = np.unique(np.floor(np.asarray(ts) / DAY), return_counts=True)
    whole = per_day[1:-1]  # the first and the last day may be cut
    typical = int(np.median(whole)) if len(whole) and step < WEEKLY_STEP else 0
    return int(daily_season(step, typical))


def timing(ts: np.ndarray, season: int | None = None) -> Timing:
    """The step, the season (``season`` if given, else detected) and the gaps."""
    step = detect_step(ts)
    spacing = np.diff(np.asarray(ts, dtype=np.float64))
    gaps = spacing[spacing > 1.5 * step]
    return Timing(
        step,
        season if season is not None else detect_season(ts, step),
        int(day_steps(step)),
        len(gaps),
        float(gaps.max()) if len(gaps) else 0.0,
        season is not None,
    )


def human_duration(seconds: float) -> str:
    """``300`` is "5 min", ``5400`` "1.5 h", ``172800`` "2 days"."""
    for unit, size in (("days", DAY), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            amount = seconds / size
            if amount == round(amount):
                return "1 day" if (amount, unit) == (1, "days") else f"{amount:.0f} {unit}"
            return f"{amount:.1f} {unit}"
    return f"{seconds:g} s"


# -- splits ------------------------------------------------------------------------------


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.7,0.1,0.2"``: train, validation and test fractions; ValueError if not three
    positive numbers that sum to 1."""
    parts = [p.strip() for p in text.split(",")]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 3 or not all(np.isfinite(numbers)):
        raise ValueError(
            f"expected three fractions train,valid,test such as 0.7,0.1,0.2, not {text!r}"
        )
    if any(n <= 0 for n in numbers):
        raise ValueError(
            f"every fraction must be above 0 (validation stops training, test scores it): {text!r}"
        )
    if abs(sum(numbers) - 1) > 1e-6:
        raise ValueError(f"the fractions must sum to 1, not {sum(numbers):g}: {text!r}")
    return numbers[0], numbers[1], numbers[2]


def fraction_split(
    series: Series,
    context: int,
    fractions: tuple[float, float, float] = FRACTIONS,
    horizon: int = 1,
) -> Split:
    """Every row, cut into train, validation and test fractions in time order."""
    total = len(series.values)
    train = int(total * fractions[0] + 1e-9)
    valid = int(total * fractions[1] + 1e-9)
    return _split(series, context, horizon, (train, valid, total - train - valid), "fractions")


def protocol_split(series: Series, lookback: int, horizon: int = 1) -> Split:
    """The published split; shorter files are cut 60/20/20 with the same rules."""
    total = len(series.values)
    if total >= TRAIN + VALID + TEST:
        train, valid, test = TRAIN, VALID, TEST
    else:
        train, valid = int(total * 0.6), int(total * 0.2)
        test = total - train - valid
    return _split(series, lookback, horizon, (train, valid, test), "ett")


def _split(
    series: Series, context: int, horizon: int, rows: tuple[int, int, int], protocol: str
) -> Split:
    train, valid, test = rows
    if train - context - horizon + 1 < 1 or valid < max(1, horizon) or test < max(1, horizon):
        raise ConfigError(
            f"{series.name}: {len(series.values)} rows are too few: the split gives train "
            f"{train}, validation {valid} and test {test} rows; with inputs of {context} rows "
            f"and horizon {horizon}, training needs more than {context + horizon - 1} rows "
            f"and validation and test {horizon} or more each (use more data, a shorter "
            "--lookback or --horizon, or another --split)"
        )
    mean = series.values[:train].mean(0)
    std = series.values[:train].std(0)
    std[std == 0] = 1.0
    scaled = (series.values - mean) / std

    def part(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return scaled[start:stop], series.ts[start:stop]

    end = train + valid + test
    return Split(
        mean,
        std,
        part(0, train),
        part(train - context, train + valid),
        part(train + valid - context, end),
        rows,
        context,
        protocol,
        len(series.values) - end,
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

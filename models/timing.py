"""A series' season from its spacing: one day of readings (a week of days for daily or
longer steps), shorter when every day misses the same hours. The same rule serves
training (:func:`models.data.detect_season`, over a whole file) and the serving baseline
(per sensor, online: :mod:`models.baseline`, :mod:`models.columns`).

Array functions: a scalar works too (as a 0-d array), so the per-sensor reference and the
columnar form compute the same floats.
"""

from __future__ import annotations

import math

import numpy as np

from models.rings import Ring, grown

DAY = 86_400.0
WEEKLY_STEP = 0.75 * DAY  # from this step on, a season is a week (daily readings, jittered)
SPACINGS = 9  # spacings kept per sensor; their median is its step
DAYS = 5  # whole days' reading counts kept per sensor; their median is its day


def day_steps(step: np.ndarray | float) -> np.ndarray:
    """Steps in a day if nothing were missing (in a week for daily or longer steps)."""
    step = np.asarray(step, dtype=np.float64)
    period = np.where(step < WEEKLY_STEP, DAY, 7 * DAY)
    return np.maximum(2, np.round(period / step)).astype(np.int64)


def daily_season(step: np.ndarray | float, typical: np.ndarray | float) -> np.ndarray:
    """The season, given the step and the readings of a typical whole day (0: none seen
    yet). A few readings missing here and there leave a day a day; a sensor that sleeps
    through part of every day has a shorter day."""
    step = np.asarray(step, dtype=np.float64)
    typical = np.asarray(typical, dtype=np.int64)
    full = day_steps(step)
    short = (step < WEEKLY_STEP) & (typical > 0) & (typical < 0.9 * full)
    return np.where(short, np.maximum(2, typical), full)


def lower_median(values: list) -> float:
    """The lower middle of the sorted values (one of them, never an average)."""
    return sorted(values)[(len(values) - 1) // 2]


def lower_medians(rows: np.ndarray) -> np.ndarray:
    """:func:`lower_median` of each row's values, NaN marking no value; NaN for a row
    without any."""
    ordered = np.sort(rows, axis=1)  # NaN sorts last
    count = np.count_nonzero(~np.isnan(rows), axis=1)
    middle = ordered[np.arange(len(rows)), np.maximum(count - 1, 0) // 2]
    return np.where(count > 0, middle, np.nan)


def spacing_rows(times: np.ndarray) -> np.ndarray:
    """The spacings between each row's last ``SPACINGS + 1`` times (NaN before the first)."""
    return np.diff(times[:, -(SPACINGS + 1) :], axis=1)


def learn(state: dict, ts: float, max_season: int) -> int:
    """Take a reading's time into a sensor's timing state (the keys of
    :func:`timing_state`); return its season (0 while its step is unknown)."""
    last = state["last_ts"]
    if last is not None and ts > last:
        spacings = state["spacings"]
        spacings.append(ts - last)
        del spacings[:-SPACINGS]
    state["last_ts"] = ts
    day = math.floor(ts / DAY)
    if day == state["day"]:
        state["today"] += 1
    else:
        if not state["cut"]:  # a whole day ended (the first one seen may be cut)
            state["days"].append(state["today"])
            del state["days"][:-DAYS]
        state["cut"] = state["day"] is None
        state["day"], state["today"] = day, 1
    if state["spacings"]:
        typical = lower_median(state["days"]) if state["days"] else 0
        season = daily_season(lower_median(state["spacings"]), typical)
        state["season"] = min(int(season), max_season)
    return state["season"]


def timing_state() -> dict:
    """A fresh sensor's timing: nothing seen."""
    return {
        "season": 0,
        "last_ts": None,
        "spacings": [],
        "day": None,
        "today": 0,
        "cut": True,
        "days": [],
    }


class TimingColumns:
    """:func:`learn` over slots: the same seasons from the same times, for many sensors
    at once (the slots of one call unique)."""

    def __init__(self, capacity: int, max_season: int) -> None:
        self.max_season = max_season
        self.season = np.zeros(capacity, np.int64)
        self.last_ts = np.full(capacity, np.nan)
        self.spacings = Ring(capacity, SPACINGS, np.float64)
        self.day = np.zeros(capacity, np.int64)
        self.has_day = np.zeros(capacity, bool)
        self.today = np.zeros(capacity, np.int64)
        self.cut = np.ones(capacity, bool)
        self.days = Ring(capacity, DAYS, np.int64)

    def grow(self, capacity: int) -> None:
        fills = {"season": 0, "last_ts": np.nan, "day": 0, "has_day": False, "today": 0}
        for name, fill in {**fills, "cut": True}.items():
            setattr(self, name, grown(getattr(self, name), capacity, fill))
        self.spacings.grow(capacity)
        self.days.grow(capacity)

    def reset(self, slots: np.ndarray) -> None:
        self.season[slots] = 0
        self.last_ts[slots] = np.nan
        self.has_day[slots] = False
        self.today[slots] = 0
        self.cut[slots] = True
        self.spacings.reset(slots)
        self.days.reset(slots)

    def learn(self, slots: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """The seasons of ``slots`` after their readings at ``ts``."""
        last = self.last_ts[slots]
        spaced = ts > last  # False for a first reading (NaN)
        self.spacings.push(slots[spaced], (ts - last)[spaced])
        self.last_ts[slots] = ts
        day = np.floor(ts / DAY).astype(np.int64)
        same = self.has_day[slots] & (day == self.day[slots])
        self.today[slots[same]] += 1
        new = slots[~same]
        ended = new[~self.cut[new]]
        self.days.push(ended, self.today[ended])
        self.cut[new] = ~self.has_day[new]
        self.day[new], self.has_day[new], self.today[new] = day[~same], True, 1
        known = slots[self.spacings.count[slots] > 0]
        if len(known):
            step, typical = _lower_median(self.spacings, known), _lower_median(self.days, known)
            season = daily_season(step, np.nan_to_num(typical).astype(np.int64))
            self.season[known] = np.minimum(season, self.max_season)
        return self.season[slots]

    def to_docs(self, slots: np.ndarray) -> list[dict]:
        return [
            {
                "season": season,
                "last_ts": None if math.isnan(last) else last,
                "spacings": spacings,
                "day": day if has else None,
                "today": today,
                "cut": cut,
                "days": days,
            }
            for season, last, spacings, day, has, today, cut, days in zip(
                self.season[slots].tolist(),
                self.last_ts[slots].tolist(),
                _lists(self.spacings, slots),
                self.day[slots].tolist(),
                self.has_day[slots].tolist(),
                self.today[slots].tolist(),
                self.cut[slots].tolist(),
                _lists(self.days, slots),
                strict=True,
            )
        ]

    def from_doc(self, slot: int, doc: dict) -> None:
        """Restore one slot; a state without timing (a fixed season's) starts afresh."""
        fresh = timing_state()
        doc = {key: doc.get(key, fresh[key]) for key in fresh}
        self.season[slot] = doc["season"]
        self.last_ts[slot] = np.nan if doc["last_ts"] is None else doc["last_ts"]
        self.spacings.set_row(slot, np.asarray(doc["spacings"], np.float64))
        self.has_day[slot] = doc["day"] is not None
        self.day[slot] = doc["day"] or 0
        self.today[slot] = doc["today"]
        self.cut[slot] = doc["cut"]
        self.days.set_row(slot, np.asarray(doc["days"], np.int64))


def _lower_median(ring: Ring, slots: np.ndarray) -> np.ndarray:
    """:func:`lower_medians` of each slot's held values (NaN where none)."""
    rows = ring.data[slots, : ring.size].astype(np.float64)
    rows[np.arange(ring.size) >= ring.count[slots, None]] = np.nan
    return lower_medians(rows)


def _lists(ring: Ring, slots: np.ndarray) -> list[list]:
    return [row.tolist() for row in ring.rows(slots)]

"""Drift detectors per sensor, from River (pure, no I/O).

=============  ==============  ==================================================
detector       signal          watches
=============  ==============  ==================================================
``adwin``      ``residual``    the production model's one-step absolute error (ADWIN)
``page_hinkley`` ``level``     the value (Page-Hinkley, both directions)
``kswin``      ``distribution`` the value's distribution (Kolmogorov-Smirnov window)
=============  ==============  ==================================================

Each signal is standardised by its reference window: its first ``reference`` values
after the sensor is first seen. After an event a detector starts afresh (on the new
regime) and stays quiet for ``cooldown`` readings, so one shift gives one event, not a
storm. Detectors live in memory only: after a restart or a rebalance they warm
up again. :class:`DriftColumns` is the same, vectorised over integer slots, for the
worker's hot path.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from river import drift

from forecast.options import SIGNALS, DriftConfig
from forecast.schemas import DriftEvent, Reading
from streams.residuals import Residual


class _Reference:
    """Standardises a signal by the mean and deviation of its first ``size`` values."""

    __slots__ = ("mean", "size", "std", "values")

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: list[float] | None = []
        self.mean, self.std = 0.0, 1.0

    def standardise(self, value: float) -> float | None:
        if self.values is not None:
            self.values.append(value)
            if len(self.values) == self.size:
                self.mean = sum(self.values) / self.size
                var = sum((v - self.mean) ** 2 for v in self.values) / self.size
                self.std = math.sqrt(var) or 1.0
                self.values = None  # only the mean and deviation are needed from now on
            return None
        return (value - self.mean) / self.std


class _Sensor:
    """The live detectors of one sensor, and the references of their signals."""

    __slots__ = ("config", "detectors", "quiet", "references")

    def __init__(self, config: DriftConfig) -> None:
        self.config = config
        self.detectors = {name: _make(name, config) for name in config.detectors}
        self.quiet = dict.fromkeys(config.detectors, 0)
        self.references = {name: _Reference(config.reference) for name in config.detectors}

    def rearm(self, name: str) -> None:
        """After an event: a fresh detector, quiet for the cooldown. The reference stays:
        filling a new one would leave the sensor unwatched for its length."""
        self.detectors[name] = _make(name, self.config)
        self.quiet[name] = self.config.cooldown


class DriftMonitor:
    """Feeds each reading (and the production forecast's one-step residual) to the
    sensor's detectors; returns the drift events. Sensors idle the longest are forgotten
    beyond ``max_sensors``."""

    def __init__(self, config: DriftConfig | None = None) -> None:
        self.config = config or DriftConfig()
        self.sensors: OrderedDict[str, _Sensor] = OrderedDict()

    def observe(self, reading: Reading, residual: Residual | None = None) -> list[DriftEvent]:
        if residual is None:
            return self.observe_value(reading.sensor_id, reading.ts, reading.value)
        return self.observe_value(
            reading.sensor_id,
            reading.ts,
            reading.value,
            residual.error,
            residual.model,
            residual.model_version,
        )

    def observe_value(
        self,
        sensor_id: str,
        ts: float,
        value: float,
        error: float | None = None,
        model: str = "",
        version: int = 0,
    ) -> list[DriftEvent]:
        """:meth:`observe` from plain values: ``error`` is the one-step residual, if any,
        of the production model ``model`` version ``version``."""
        sensor = self._sensor(sensor_id)
        events = []
        for name, detector in sensor.detectors.items():
            if name == "adwin":
                if error is None:
                    continue
                raw = abs(error)
            else:
                raw = value
            standardised = sensor.references[name].standardise(raw)
            if standardised is None:
                continue  # the reference is still filling
            detector.update(standardised)
            if sensor.quiet[name] > 0:
                sensor.quiet[name] -= 1
                continue
            if detector.drift_detected:
                detail = {"standardised": round(standardised, 6), "value": value}
                if error is not None:
                    detail["error"] = round(error, 6)
                else:
                    model, version = "", 0
                events.append(
                    DriftEvent(sensor_id, ts, name, SIGNALS[name], model, version, detail)
                )
                sensor.rearm(name)
        return events

    def _sensor(self, sensor_id: str) -> _Sensor:
        sensor = self.sensors.get(sensor_id)
        if sensor is None:
            sensor = self.sensors[sensor_id] = _Sensor(self.config)
            if len(self.sensors) > self.config.max_sensors:
                self.sensors.popitem(last=False)
        else:
            self.sensors.move_to_end(sensor_id)
        return sensor


def _make(name: str, config: DriftConfig):
    if name == "adwin":
        return drift.ADWIN(delta=config.adwin_delta)
    if name == "page_hinkley":
        return drift.PageHinkley(
            min_instances=30, delta=config.ph_delta, threshold=config.ph_threshold, mode="both"
        )
    return drift.KSWIN(
        alpha=config.ks_alpha, window_size=config.ks_window, stat_size=config.ks_stat, seed=0
    )


class _ReferenceColumns:
    """:class:`_Reference` for many slots: the first ``size`` values of each, added up in
    order, then the mean and deviation exactly as the reference has them. The values of
    the slots still filling are kept in rows of a shared pool, returned once complete."""

    def __init__(self, size: int, capacity: int) -> None:
        self.size = size
        self.total = np.zeros(capacity)  # as Python's left-to-right ``sum``
        self.count = np.zeros(capacity, np.int64)
        self.done = np.zeros(capacity, bool)
        self.mean = np.zeros(capacity)
        self.std = np.ones(capacity)
        self.row = np.full(capacity, -1)  # the slot's row in the pool, -1 if none
        self.pool = np.zeros((0, max(size, 0)))
        self.free = np.zeros(0, np.int64)

    def grow(self, capacity: int) -> None:
        extra = capacity - len(self.done)
        self.total = np.concatenate([self.total, np.zeros(extra)])
        self.count = np.concatenate([self.count, np.zeros(extra, np.int64)])
        self.done = np.concatenate([self.done, np.zeros(extra, bool)])
        self.mean = np.concatenate([self.mean, np.zeros(extra)])
        self.std = np.concatenate([self.std, np.ones(extra)])
        self.row = np.concatenate([self.row, np.full(extra, -1)])

    def reset(self, slots: np.ndarray) -> None:
        self._release(slots)
        self.total[slots], self.count[slots], self.done[slots] = 0.0, 0, False
        self.mean[slots], self.std[slots] = 0.0, 1.0

    def standardise(self, slots: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ready, standardised)``: the positions whose reference was complete, and their
        standardised values; the others fill their references."""
        done = self.done[slots]
        if not done.all():
            self._fill(slots[~done], raw[~done])
        ready = np.flatnonzero(done)
        slots = slots[ready]
        return ready, (raw[ready] - self.mean[slots]) / self.std[slots]

    def _fill(self, slots: np.ndarray, values: np.ndarray) -> None:
        count = self.count[slots]
        room = count < self.size
        self._claim(slots[room & (self.row[slots] < 0)])
        self.pool[self.row[slots[room]], count[room]] = values[room]
        self.total[slots] += values
        self.count[slots] = count = count + 1
        full = slots[count == self.size]
        if len(full):
            mean = self.mean[full] = self.total[full] / self.size
            # np.cumsum adds in order, as ``sum`` does (np.sum adds pairwise)
            squares = np.cumsum((self.pool[self.row[full]] - mean[:, None]) ** 2, axis=1)
            std = np.sqrt(squares[:, -1] / self.size)
            self.std[full] = np.where(std == 0.0, 1.0, std)  # ``math.sqrt(var) or 1.0``
            self.done[full] = True
            self._release(full)

    def _claim(self, slots: np.ndarray) -> None:
        short = len(slots) - len(self.free)
        if short > 0:
            rows = len(self.pool)
            more = max(short, rows)
            self.pool = np.concatenate([self.pool, np.zeros((more, self.pool.shape[1]))])
            self.free = np.concatenate([np.arange(rows, rows + more), self.free])
        self.row[slots] = self.free[len(self.free) - len(slots) :]
        self.free = self.free[: len(self.free) - len(slots)]

    def _release(self, slots: np.ndarray) -> None:
        rows = self.row[slots]
        self.free = np.concatenate([self.free, rows[rows >= 0]])
        self.row[slots] = -1
        if len(self.free) == len(self.pool):  # no slot is filling: give the memory back
            self.pool, self.free = self.pool[:0].copy(), self.free[:0]


class _PageHinkleyColumns:
    """River's ``PageHinkley`` (mode "both") for many slots, in River's operation order so
    that each slot's state is bit for bit that of its own River detector."""

    _START = {"n": 0.0, "mean": 0.0, "up": 0.0, "down": 0.0, "min_up": math.inf, "max_down": -1.0}

    def __init__(self, config: DriftConfig, capacity: int) -> None:
        river = _make("page_hinkley", config)
        self.min_instances, self.delta = river.min_instances, river.delta
        self.threshold, self.alpha = river.threshold, river.alpha
        self.state = {field: np.full(capacity, start) for field, start in self._START.items()}
        self.drift = np.zeros(capacity, bool)

    def grow(self, capacity: int) -> None:
        extra = capacity - len(self.drift)
        for field, start in self._START.items():
            self.state[field] = np.concatenate([self.state[field], np.full(extra, start)])
        self.drift = np.concatenate([self.drift, np.zeros(extra, bool)])

    def reset(self, slots: np.ndarray) -> None:
        for field, start in self._START.items():
            self.state[field][slots] = start
        self.drift[slots] = False

    def update(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """One ``update`` per slot; returns ``drift_detected`` after it."""
        self.reset(slots[self.drift[slots]])  # River resets at the update after a detection
        n, mean, up, down, min_up, max_down = (self.state[field][slots] for field in self._START)
        n = n + 1.0  # stats.Mean.update, w = 1.0
        mean = mean + (1.0 / n) * (x - mean)
        dev = x - mean
        up = self.alpha * up + dev - self.delta
        down = self.alpha * down + dev + self.delta
        min_up = np.where(up < min_up, up, min_up)  # River's ``if`` (not np.minimum: NaN)
        max_down = np.where(down > max_down, down, max_down)
        # below min_instances River leaves the flag as the reset left it: False
        drift = (n >= self.min_instances) & (
            (up - min_up > self.threshold) | (max_down - down > self.threshold)
        )
        for field, column in zip(self._START, (n, mean, up, down, min_up, max_down), strict=True):
            self.state[field][slots] = column
        self.drift[slots] = drift
        return drift


class _RiverColumns:
    """River's own detectors (ADWIN, KSWIN), one per slot, made on first use and fed one
    value at a time."""

    def __init__(self, name: str, config: DriftConfig, capacity: int) -> None:
        self.name, self.config = name, config
        self.detectors: list = [None] * capacity

    def grow(self, capacity: int) -> None:
        self.detectors.extend([None] * (capacity - len(self.detectors)))

    def reset(self, slots: np.ndarray) -> None:
        for slot in np.asarray(slots).tolist():
            self.detectors[slot] = None

    def update(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """One ``update`` per slot; returns ``drift_detected`` after it."""
        detected = []
        detectors, name, config = self.detectors, self.name, self.config
        for i, (slot, value) in enumerate(zip(slots.tolist(), x.tolist(), strict=True)):
            detector = detectors[slot]
            if detector is None:
                detector = detectors[slot] = _make(name, config)
            detector.update(value)
            if detector.drift_detected:
                detected.append(i)
        drift = np.zeros(len(slots), bool)
        drift[detected] = True
        return drift


class DriftColumns:
    """:class:`DriftMonitor` for the hot path: each sensor has an integer slot, and one
    :meth:`observe` covers many sensors at once (each slot at most once per call).

    Per slot it emits exactly what :meth:`DriftMonitor.observe_value` would, reading by
    reading. Page-Hinkley, the references and the cooldowns are numpy columns; ADWIN and
    KSWIN stay River's objects, fed one by one. Unlike :class:`DriftMonitor` it forgets no
    sensor (no ``max_sensors``): the caller owns the slots, :meth:`reset` one it hands to a
    new sensor and :meth:`grow` them when it needs more."""

    def __init__(self, config: DriftConfig | None = None, capacity: int = 1024) -> None:
        self.config = config or DriftConfig()
        self.names = list(dict.fromkeys(self.config.detectors))
        self.capacity = capacity
        size = self.config.reference
        self.references = {name: _ReferenceColumns(size, capacity) for name in self.names}
        self.quiet = {name: np.zeros(capacity, np.int64) for name in self.names}
        self.detectors = {name: self._detector(name, capacity) for name in self.names}

    def _detector(self, name: str, capacity: int) -> _PageHinkleyColumns | _RiverColumns:
        if name == "page_hinkley":
            return _PageHinkleyColumns(self.config, capacity)
        return _RiverColumns(name, self.config, capacity)

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` slots, keeping every slot's state (never shrinks)."""
        if capacity <= self.capacity:
            return
        extra = np.zeros(capacity - self.capacity, np.int64)
        for name in self.names:
            self.references[name].grow(capacity)
            self.detectors[name].grow(capacity)
            self.quiet[name] = np.concatenate([self.quiet[name], extra])
        self.capacity = capacity

    def reset(self, slots: np.ndarray) -> None:
        """Those slots start afresh, as a new sensor: new detectors and references."""
        slots = np.unique(np.asarray(slots, np.int64))
        for name in self.names:
            self.references[name].reset(slots)
            self.detectors[name].reset(slots)
            self.quiet[name][slots] = 0

    def observe(
        self,
        slots: np.ndarray,
        sensor_ids: Sequence[str],
        ts: np.ndarray,
        values: np.ndarray,
        errors: np.ndarray,
        models: Sequence[str],
        versions: Sequence[int],
    ) -> list[tuple[int, DriftEvent]]:
        """Feeds reading ``i`` to slot ``slots[i]``: ``errors[i]`` is its one-step residual
        (NaN if none) of model ``models[i]`` version ``versions[i]``. Returns ``(i, event)``
        in :class:`DriftMonitor`'s order: by reading, then detector."""
        slots = np.asarray(slots, np.int64)
        values = np.asarray(values, np.float64)
        errors = np.asarray(errors, np.float64)
        hits: list[tuple[int, int, float]] = []
        for order, name in enumerate(self.names):
            if name == "adwin":
                index = np.flatnonzero(~np.isnan(errors))
                raw = np.abs(errors[index])
            else:
                index, raw = np.arange(len(slots)), values
            for i, standardised in self._feed(name, slots[index], raw):
                hits.append((int(index[i]), order, standardised))
        hits.sort(key=lambda hit: hit[:2])
        reading = (sensor_ids, ts, values, errors, models, versions)
        return [(i, _event(i, self.names[order], s, *reading)) for i, order, s in hits]

    def _feed(self, name: str, slots: np.ndarray, raw: np.ndarray) -> list[tuple[int, float]]:
        """One detector's step for these slots: ``(position, standardised)`` of its events."""
        ready, standardised = self.references[name].standardise(slots, raw)
        if not len(ready):
            return []
        slots = slots[ready]
        drift = self.detectors[name].update(slots, standardised)
        quiet = self.quiet[name]
        hushed = quiet[slots] > 0
        quiet[slots[hushed]] -= 1
        fired = np.flatnonzero(drift & ~hushed)
        if len(fired):
            self._rearm(name, slots[fired])
        return list(zip(ready[fired].tolist(), standardised[fired].tolist(), strict=True))

    def _rearm(self, name: str, slots: np.ndarray) -> None:
        """:meth:`_Sensor.rearm` for those slots: a fresh detector, quiet for the cooldown."""
        self.detectors[name].reset(slots)
        self.quiet[name][slots] = self.config.cooldown


def _event(
    i: int,
    name: str,
    standardised: float,
    sensor_ids: Sequence[str],
    ts: np.ndarray,
    values: np.ndarray,
    errors: np.ndarray,
    models: Sequence[str],
    versions: Sequence[int],
) -> DriftEvent:
    """The event of reading ``i``, as :meth:`DriftMonitor.observe_value` builds it, with
    Python floats (``round`` of a numpy float gives a numpy float)."""
    detail = {"standardised": round(standardised, 6), "value": float(values[i])}
    error = float(errors[i])
    model, version = "", 0
    if not math.isnan(error):
        detail["error"] = round(error, 6)
        model, version = str(models[i]), int(versions[i])
    return DriftEvent(sensor_ids[i], float(ts[i]), name, SIGNALS[name], model, version, detail)

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
up again.
"""

from __future__ import annotations

import math
from collections import OrderedDict

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
        sensor = self._sensor(reading.sensor_id)
        raw = {"page_hinkley": reading.value, "kswin": reading.value}
        if residual is not None:
            raw["adwin"] = abs(residual.error)
        events = []
        for name, detector in sensor.detectors.items():
            if name not in raw:
                continue
            value = sensor.references[name].standardise(raw[name])
            if value is None:
                continue  # the reference is still filling
            detector.update(value)
            if sensor.quiet[name] > 0:
                sensor.quiet[name] -= 1
                continue
            if detector.drift_detected:
                events.append(self._event(reading, name, value, residual))
                sensor.rearm(name)
        return events

    def _event(
        self, reading: Reading, name: str, value: float, residual: Residual | None
    ) -> DriftEvent:
        detail = {"standardised": round(value, 6), "value": reading.value}
        model, version = "", 0
        if residual is not None:
            model, version = residual.model, residual.model_version
            detail["error"] = round(residual.error, 6)
        return DriftEvent(
            reading.sensor_id, reading.ts, name, SIGNALS[name], model, version, detail
        )

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

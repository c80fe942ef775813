"""The reference processing of one micro-batch of raw records (no I/O): one object per
reading, in plain Python. The worker runs :class:`streams.engine.Engine`, which gives the
same results over columns (``tests/test_engine.py`` runs both on the same records).
Every forecaster runs once per batch over all its sensors (one forward pass per step
round), and the production model falls back to the baseline per sensor while it warms
up, or if it fails or returns non-finite values. A model with a cadence publishes only
at its due readings.

Late and out-of-order readings, by event time against the sensor's latest reading:
within ``allowed_lateness`` they are stored and, once the batch's forecasts are made,
placed into every forecaster's windows where they belong in time (a repeated time
replaces the value), if they fall among the sensor's last ``RECENT`` readings; beyond
the lateness they are rejected with reason ``late``. Forecasts already published stay.
A record the sensor's state already took in (same partition, offset not past the one it
remembers) is a delivery again after a crash: skipped and counted as ``redelivered``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from forecast import metrics
from forecast.schemas import DriftEvent, Prediction, Reading
from forecast.tracing import TRACER
from models.base import NOT_DUE, Interval, ModelSet, NotDue, StreamingForecaster, is_finite
from streams.drift import DriftMonitor
from streams.residuals import Residual, ResidualTracker
from streams.state import SensorState
from streams.validate import Limits, Rejection, parse_record

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


Accepted = tuple[Reading, SensorState, float | None]  # reading, its sensor, step as of it
Forecasts = list[Interval | NotDue | None]


class Runs(NamedTuple):
    """Each model's forecasts for the batch's accepted readings, in order."""

    base: Forecasts
    main: Forecasts | None
    failed: bool  # the production model raised: the baseline serves
    shadow: Forecasts | None


@dataclass(slots=True)
class BatchResult:
    readings: list[Reading] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)  # published and stored
    shadow: list[Prediction] = field(default_factory=list)  # stored only
    rejected: list[tuple[RawRecord, Rejection]] = field(default_factory=list)
    touched: dict[str, tuple[int, SensorState]] = field(default_factory=dict)
    late: list[tuple[Reading, SensorState]] = field(default_factory=list)  # to correct
    residuals: list[Residual] = field(default_factory=list)
    drift: list[DriftEvent] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)  # accepted, out_of_order, duplicate
    offsets: dict[str, int] = field(default_factory=dict)  # sensor -> its latest record
    fallbacks: Counter = field(default_factory=Counter)  # warming_up, failed


class BatchProcessor:
    """Validates records, advances per-sensor state and forecasts, for one batch."""

    def __init__(
        self,
        models: Callable[[], ModelSet],
        limits: Limits,
        allowed_lateness: float,
        load_state: Callable[[str], SensorState | None],
        clock: Callable[[], float] = time.time,
        tracker: ResidualTracker | None = None,
        drift: DriftMonitor | None = None,
    ) -> None:
        self.models = models
        self.limits = limits
        self.allowed_lateness = allowed_lateness
        self.load_state = load_state
        self.clock = clock
        self.tracker = tracker or ResidualTracker()
        self.drift = drift

    def process(self, records: list[RawRecord]) -> BatchResult:
        result = BatchResult()
        now = self.clock()
        accepted: list[Accepted] = []
        with TRACER.start_as_current_span("ingest") as span:
            for record in records:
                readings, rejections = parse_record(record.value, self.limits, now)
                result.rejected.extend((record, rejection) for rejection in rejections)
                for reading in readings:
                    state = self._admit(record, reading, result)
                    if state is not None:  # the step as of this reading (later ones move it)
                        accepted.append((reading, state, state.step))
            span.set_attribute("readings.accepted", len(accepted))
            span.set_attribute("readings.rejected", len(result.rejected))
        for sensor_id, (partition, state) in result.touched.items():
            state.source = (partition, result.offsets[sensor_id])
        if accepted:
            self._forecast(accepted, result, now)
        if result.late:
            with TRACER.start_as_current_span("features.corrections"):
                self._correct(result)
        return result

    def _admit(
        self, record: RawRecord, reading: Reading, result: BatchResult
    ) -> SensorState | None:
        """Classify a reading by event time; return its state if it advances the sensor."""
        touched = result.touched.get(reading.sensor_id)
        state = touched[1] if touched else self.load_state(reading.sensor_id) or SensorState()
        if state.reflects(record.partition, record.offset):  # its batch was stored already
            result.outcomes["redelivered"] += 1
            return None
        result.offsets[reading.sensor_id] = record.offset
        if state.last_ts is not None and reading.ts <= state.last_ts:
            if reading.ts < state.last_ts - self.allowed_lateness:
                detail = f"{state.last_ts - reading.ts:.0f}s older than the latest reading"
                result.rejected.append((record, Rejection("late", detail)))
                return None
            result.outcomes["duplicate" if reading.ts == state.last_ts else "out_of_order"] += 1
            result.readings.append(reading)
            result.late.append((reading, state))
            result.touched[reading.sensor_id] = (record.partition, state)
            return None
        result.outcomes["accepted"] += 1
        result.readings.append(reading)
        result.touched[reading.sensor_id] = (record.partition, state)
        state.observe(reading.ts)
        return state

    def _correct(self, result: BatchResult) -> None:
        """Place late readings into the windows of every model state the sensor has."""
        models = self.models()
        serving = {state_key(m): m for m in models.serving()}
        for reading, state in result.late:
            where = state.place(reading.ts)
            if where is None:
                result.outcomes["too_old_to_correct"] += 1
                continue
            for key, own in state.models.items():
                if key in serving:
                    serving[key].correct(own, reading.value, *where)

    def _forecast(self, accepted: list[Accepted], result: BatchResult, now: float) -> None:
        models = self.models()
        base, _ = _run(models.baseline, accepted)
        main, failed = _run(models.production, accepted) if models.production else (None, False)
        shadow, _ = _run(models.shadow, accepted) if models.shadow else (None, False)
        runs = Runs(base, main, failed, shadow)
        serving = {state_key(m) for m in models.serving()}
        scored = {state_key(m) for m in (models.production, models.shadow) if m}
        for _, state in result.touched.values():  # once per sensor, not per reading
            for stale in state.models.keys() - serving:
                del state.models[stale]  # a model that no longer serves
            self.tracker.prune(state.residuals, scored | {state_key(models.baseline)})
        with TRACER.start_as_current_span("features"):  # residuals, drift, predictions
            self._assemble(accepted, models, runs, result, now)

    def _assemble(
        self,
        accepted: list[Accepted],
        models: ModelSet,
        runs: Runs,
        result: BatchResult,
        now: float,
    ) -> None:
        """Per reading, in order: score residuals and drift, then make its predictions."""
        base, main, failed, shadow = runs
        for i, (reading, state, step) in enumerate(accepted):
            self._score(reading, state, result)
            if step is None:
                continue  # the step needs two readings
            if main is None or main[i] is not NOT_DUE:  # a cadence skips readings
                chosen, forecaster = _choose(
                    base[i], None if main is None else main[i], failed, models, result
                )
                if forecaster is not None:
                    state.seq += 1
                    made = Prediction(
                        reading.sensor_id,
                        reading.ts,
                        now,
                        forecaster.name,
                        forecaster.version,
                        step,
                        *chosen,
                        state.seq,
                    )
                    result.predictions.append(made)
                    self.tracker.expect(state.residuals, made)
            if shadow is not None and _usable(shadow[i]):
                made = Prediction(
                    reading.sensor_id,
                    reading.ts,
                    now,
                    models.shadow.name,
                    models.shadow.version,
                    step,
                    *shadow[i],
                    state.seq,
                    "shadow",
                )
                result.shadow.append(made)
                self.tracker.expect(state.residuals, made)

    def _score(self, reading: Reading, state: SensorState, result: BatchResult) -> None:
        """Residuals the reading completes, and what the drift detectors make of them."""
        done = self.tracker.observe(state.residuals, reading.sensor_id, reading.ts, reading.value)
        result.residuals += done
        if self.drift is not None:
            one_step = [r for r in done if r.horizon == 1 and r.stage == "production"]
            result.drift += self.drift.observe(reading, one_step[0] if one_step else None)


def _choose(
    base: Interval | None,
    main: Interval | NotDue | None,
    failed: bool,
    models: ModelSet,
    result: BatchResult,
) -> tuple[Interval | None, StreamingForecaster | None]:
    """The production forecast if usable, else the baseline's (counted); (None, None)
    when neither is."""
    if models.production is not None:
        if _usable(main):
            return main, models.production
        result.fallbacks["warming_up" if main is None and not failed else "failed"] += 1
    if _usable(base):
        return base, models.baseline
    result.outcomes["forecast_failed"] += 1
    return None, None


def _usable(forecast: Interval | NotDue | None) -> bool:
    return isinstance(forecast, tuple) and is_finite(forecast)


def state_key(forecaster: StreamingForecaster) -> str:
    """Each model version keeps its own per-sensor state; a new version starts afresh."""
    return f"{forecaster.name}@{forecaster.version}"


def _run(
    forecaster: StreamingForecaster, accepted: list[Accepted]
) -> tuple[list[Interval | NotDue | None], bool]:
    """One forecaster over the batch, and whether it failed (then the baseline serves)."""
    key = state_key(forecaster)
    states = []
    for _, state, _ in accepted:
        own = state.models.get(key)
        if own is None:
            own = state.models[key] = forecaster.init_state()
        states.append(own)
    started = time.perf_counter()
    attributes = {"model": forecaster.name, "model.version": forecaster.version}
    with TRACER.start_as_current_span("inference", attributes=attributes):
        try:
            forecasts = forecaster.step(
                [
                    (own, reading.value, reading.ts)
                    for own, (reading, _, _) in zip(states, accepted, strict=True)
                ]
            )
        except Exception:  # a model bug must not stop the stream: fall back and count it
            log.exception("forecaster %s v%s failed", forecaster.name, forecaster.version)
            return [None] * len(accepted), True
    metrics.INFERENCE_SECONDS.labels(forecaster.name).observe(time.perf_counter() - started)
    metrics.INFERENCE_READINGS.labels(forecaster.name).observe(len(accepted))
    return forecasts, False

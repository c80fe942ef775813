"""The worker's processing of one micro-batch of raw records (no I/O).

The agent hands a batch of records to :meth:`BatchProcessor.process`, then stores what
comes back (readings, predictions, rejections) and only then acknowledges the records.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from forecast.errors import ModelError
from forecast.schemas import Prediction, Reading
from models.base import StreamingForecaster, check_finite
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


@dataclass(slots=True)
class BatchResult:
    readings: list[Reading] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    rejected: list[tuple[RawRecord, Rejection]] = field(default_factory=list)
    touched: dict[str, tuple[int, SensorState]] = field(default_factory=dict)
    outcomes: Counter = field(default_factory=Counter)  # accepted / out_of_order / duplicate


class BatchProcessor:
    """Validates records, advances per-sensor state and forecasts, for one batch."""

    def __init__(
        self,
        forecaster: StreamingForecaster,
        limits: Limits,
        allowed_lateness: float,
        load_state: Callable[[str], SensorState | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.forecaster = forecaster
        self.limits = limits
        self.allowed_lateness = allowed_lateness
        self.load_state = load_state
        self.clock = clock

    def process(self, records: list[RawRecord]) -> BatchResult:
        result = BatchResult()
        now = self.clock()
        for record in records:
            readings, rejections = parse_record(record.value, self.limits, now)
            result.rejected.extend((record, rejection) for rejection in rejections)
            for reading in readings:
                self._one(record, reading, result, now)
        return result

    def _one(self, record: RawRecord, reading: Reading, result: BatchResult, now: float) -> None:
        touched = result.touched.get(reading.sensor_id)
        state = touched[1] if touched else self._state(reading.sensor_id)
        if state.last_ts is not None and reading.ts <= state.last_ts:
            if reading.ts < state.last_ts - self.allowed_lateness:
                detail = f"{state.last_ts - reading.ts:.0f}s older than the latest reading"
                result.rejected.append((record, Rejection("late", detail)))
                return
            # Inside the allowed lateness: stored for analysts, the forecaster moves on.
            outcome = "duplicate" if reading.ts == state.last_ts else "out_of_order"
            result.outcomes[outcome] += 1
            result.readings.append(reading)
            return
        result.outcomes["accepted"] += 1
        result.readings.append(reading)
        result.touched[reading.sensor_id] = (record.partition, state)
        state.observe(reading.ts)
        self.forecaster.update(state.model, reading.value)
        try:
            forecast = self.forecaster.forecast(state.model)
            if forecast is None or state.step is None:
                return  # not enough history yet (the step needs two readings)
            yhat, lower, upper = check_finite(forecast)
        except (ModelError, ValueError, ArithmeticError) as exc:
            log.warning("forecast failed for %s: %s", reading.sensor_id, exc)
            result.outcomes["forecast_failed"] += 1
            return
        state.seq += 1
        result.predictions.append(
            Prediction(
                sensor_id=reading.sensor_id,
                ts=reading.ts,
                issued_at=now,
                model=self.forecaster.name,
                model_version=self.forecaster.version,
                step_seconds=state.step or 0.0,
                yhat=yhat,
                lower=lower,
                upper=upper,
                seq=state.seq,
            )
        )

    def _state(self, sensor_id: str) -> SensorState:
        state = self.load_state(sensor_id)
        if state is None:
            state = SensorState(model=self.forecaster.init_state())
        return state

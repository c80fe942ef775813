"""The bodies of the operator's console routes (:mod:`gateway.api.console`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from gateway.api.schemas import Forecast, ModelVersion

RATE_WINDOW = 60.0  # seconds over which readings/s and predictions/s are averaged


class Me(BaseModel):
    """The caller, as the console shows it and decides what to offer."""

    key_id: str
    role: str
    scopes: list[str]
    can: dict[str, bool] = Field(description="`sql`, `models`, `keys`: what the role allows")


class BatchTime(BaseModel):
    count: int
    mean_seconds: float | None
    p95_seconds: float | None = Field(description="upper bound of the bucket holding the p95")


class Pipeline(BaseModel):
    readings_per_second: float = Field(description=f"accepted, over the last {RATE_WINDOW:g} s")
    predictions_per_second: float
    readings_total: int = Field(description="accepted since this process started")
    dead_letters: dict[str, int] = Field(description="rejected readings by reason")
    consumer_lag: int = Field(description="records behind, all partitions together")
    batch: BatchTime
    fallbacks: dict[str, int] = Field(description="baseline instead of production, by reason")
    subscribers: int = Field(description="open websocket connections")
    predictions: dict[str, int] = Field(description="published, by model")
    drift_events: int
    worker_in_process: bool = Field(description="whether the worker's metrics are these")


class Serving(BaseModel):
    name: str
    version: int
    stage: str


class Overview(BaseModel):
    at: str
    pipeline: Pipeline
    serving: list[Serving] = Field(description="models the worker in this process serves")
    sensors: int = Field(description="sensors with a live forecast (in the caller's scope)")


class LeaderRow(BaseModel):
    model: str
    model_version: int
    stage: str = Field(description="in the registry now (`baseline`: the fallback)")
    steps: int
    sensors: int
    mae: float | None
    coverage: float | None


class Leaderboard(BaseModel):
    start: str
    stop: str
    paired: bool = Field(description="only steps that production and shadow both forecast")
    rows: list[LeaderRow] = Field(description="lowest MAE first")
    models: list[ModelVersion] = Field(description="the registry's versions")


class DriftEventOut(BaseModel):
    sensor_id: str
    ts: str
    detector: str
    signal: str
    model: str
    model_version: int
    detail: dict[str, Any]


class DriftEvents(BaseModel):
    events: list[DriftEventOut] = Field(description="newest first")


class SensorRow(BaseModel):
    sensor_id: str
    seq: int
    ts: str
    model: str
    model_version: int
    next: float | None = Field(description="the latest forecast's first step")
    online_mae: float | None = Field(description="step 1, the serving model (worker's gauge)")
    online_coverage: float | None
    last_drift: str | None
    drift_events: int


class SensorPage(BaseModel):
    total: int = Field(description="sensors matching the pattern")
    offset: int
    sensors: list[SensorRow]


class Actuals(BaseModel):
    ts: list[float] = Field(description="epoch seconds, oldest first")
    value: list[float]


class Stretch(BaseModel):
    """Consecutive published forecasts from one model version."""

    model: str
    model_version: int
    start: str
    stop: str = Field(description="the last forecast's reading time")
    forecasts: int
    fallback: bool = Field(description="the baseline, issued while a production model was set")


class OnlineError(BaseModel):
    model: str
    horizon: int
    mae: float
    coverage: float | None


class StoredError(BaseModel):
    steps: int
    mae: float | None
    coverage: float | None


class SensorDetail(BaseModel):
    sensor_id: str
    actuals: Actuals
    truncated: bool = Field(description="more readings in the range than were returned")
    forecast: Forecast | None = Field(description="the latest live forecast")
    stretches: list[Stretch] = Field(description="oldest first")
    drift: list[DriftEventOut] = Field(description="oldest first")
    online: list[OnlineError] = Field(description="the worker's per-sensor gauges")
    errors: StoredError = Field(description="step 1 over the range, from the store")


# -- routes -------------------------------------------------------------------------------

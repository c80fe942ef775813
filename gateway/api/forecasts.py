"""``POST /v1/forecast``: forecasts on demand, from sensors' stored readings or posted
series, with what-if overrides beside the plain forecast (:mod:`gateway.forecasts`)."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from gateway.api.context import ApiContext, Context, Viewer
from gateway.api.errors import responses
from gateway.forecasts import OnDemand

router = APIRouter(tags=["forecasts"])

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
SensorId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,200}$", examples=["ETTh1.OT"])]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReadingIn(Body):
    ts: Number | str = Field(description="RFC 3339 or epoch seconds")
    value: Number


class SeriesIn(Body):
    sensor_id: SensorId
    readings: list[ReadingIn] = Field(description="oldest first; at most 10,000")


class WhatIf(Body):
    next_values: dict[str, list[Number]] | None = Field(
        None, description="per sensor: assumed next readings, one step apart, appended"
    )
    covariates: dict[str, dict[str, list[Number]]] | None = Field(
        None, description="per sensor: future values of the model's known covariates (TFT)"
    )


class ForecastRequest(Body):
    sensors: list[SensorId] | None = Field(None, description="forecast from the stored state")
    series: list[SeriesIn] | None = Field(None, description="or from posted readings")
    horizon: Annotated[int, Field(strict=True, ge=1)] | None = Field(
        None, description="steps, 1..the model's horizon; default all"
    )
    model: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")] | None = Field(
        None, description="the model's name (with model_version)"
    )
    model_version: Annotated[int, Field(strict=True, ge=1)] | None = Field(
        None, description="a registry version; default the production model"
    )
    what_if: WhatIf | None = None


class Interval(BaseModel):
    ts: str = Field(description="the last reading used (assumed ones included), RFC 3339")
    yhat: list[float]
    lower: list[float]
    upper: list[float]


class OnDemandForecast(Interval):
    sensor_id: str
    model: str
    model_version: int
    step_seconds: float
    what_if: Interval | None


class OnDemandForecasts(BaseModel):
    forecasts: list[OnDemandForecast]


def service(ctx: ApiContext) -> OnDemand:
    """The context's on-demand forecaster (one with defaults if it was given none)."""
    if ctx.ondemand is None:
        ctx.ondemand = OnDemand(ctx.registry, ctx.store)
    return ctx.ondemand


@router.post(
    "/forecast",
    summary="Forecast sensors now, or posted series, with what-if overrides",
    response_model=OnDemandForecasts,
    responses=responses(400, 403, 404, 413, 503),
)
def on_demand(ctx: Context, who: Viewer, body: ForecastRequest) -> Response:
    answer = service(ctx).answer(body.model_dump(mode="json", exclude_none=True), who)
    return Response(orjson.dumps(answer), media_type="application/json")

"""Live forecasts per sensor (from the hub) and their history (from the store)."""

from __future__ import annotations

import time
from typing import Annotated

import orjson
from fastapi import APIRouter, Path, Query
from starlette.requests import Request
from starlette.responses import Response

from gateway.api import caching
from gateway.api.context import Context, Viewer, need
from gateway.api.errors import error, responses
from gateway.api.schemas import Forecast, History, Sensors, SensorSummary, Time
from gateway.history import forecast_history

router = APIRouter(tags=["forecasts"])
SensorId = Annotated[
    str,
    Path(description="e.g. `ETTh1.OT`", json_schema_extra={"pattern": r"^[A-Za-z0-9_.:-]{1,200}$"}),
]


@router.get("/sensors", summary="Sensors with a live forecast", responses=responses(503))
async def sensors(ctx: Context, who: Viewer) -> Sensors:
    hub = need(ctx.hub, "the live feed")
    return Sensors(
        sensors=[
            SensorSummary(sensor_id=s, seq=m["seq"], ts=m["ts"], model=m["model"])
            for s, m in sorted(hub.latest.items())
            if who.sees(s)
        ]
    )


@router.get(
    "/sensors/{sensor_id}/forecast",
    summary="The latest forecast of a sensor",
    description="Conditional: `ETag` (weak) and `If-None-Match` (304 without a body).",
    response_model=Forecast,
    responses={**responses(404, 503), 304: {"description": "the caller's copy is current"}},
)
async def latest(request: Request, ctx: Context, who: Viewer, sensor_id: SensorId) -> Response:
    message = need(ctx.hub, "the live feed").latest.get(sensor_id)
    if message is None or not who.sees(sensor_id):
        return error(404, "not_found", f"no forecast for sensor {sensor_id!r} yet")
    tag = caching.tag_of(
        sensor_id, message["seq"], message["issued_at"], message["model"], message["model_version"]
    )
    return caching.conditional(request, tag, caching.LATEST_MAX_AGE, lambda: orjson.dumps(message))


@router.get(
    "/sensors/{sensor_id}/forecasts",
    summary="Forecast history of a sensor (published ones), newest first",
    description="Conditional: `ETag` (weak) and `If-None-Match` (304 without a body).",
    response_model=History,
    responses={**responses(400, 404, 503), 304: {"description": "the caller's copy is current"}},
)
def history(
    request: Request,
    ctx: Context,
    who: Viewer,
    sensor_id: SensorId,
    start: Annotated[Time, Query(alias="from", description="readings at or after")] = None,
    stop: Annotated[Time, Query(alias="to", description="readings before")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    if not who.sees(sensor_id):
        return error(404, "not_found", f"no forecasts for sensor {sensor_id!r}")
    found = forecast_history(need(ctx.store, "the store"), sensor_id, start, stop, limit)
    body = orjson.dumps({"sensor_id": sensor_id, "forecasts": found})
    settled = stop is not None and stop.timestamp() < time.time() - caching.SETTLED_AFTER
    max_age = caching.SETTLED_MAX_AGE if settled else caching.HISTORY_MAX_AGE
    return caching.conditional(request, caching.tag_of(body), max_age, lambda: body)

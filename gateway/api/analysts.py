"""Analysts' routes: read-only SQL and exports, scoped to the caller's sensors."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response, StreamingResponse

from gateway.api.audit import AuditedRoute, audited, note
from gateway.api.context import Analyst, Context, need
from gateway.api.errors import error, responses
from gateway.api.schemas import QueryRequest, QueryResult, Time
from sinks.audit import sql_detail
from sinks.export import MEDIA_TYPES, ExportRequest, export
from sinks.query import Access, run_readonly

router = APIRouter(tags=["analysts"], route_class=AuditedRoute)


@router.post(
    "/query",
    summary="One SELECT or DESCRIBE, read-only, capped, scoped (analyst)",
    response_model=QueryResult,
    responses=responses(400, 503),
)
@audited("query")
def query(request: Request, ctx: Context, who: Analyst, body: QueryRequest) -> Response:
    note(request, target="sql", **sql_detail(body.sql))
    store = need(ctx.store, "the store")
    cap = ctx.limits.max_rows
    max_rows = cap if body.max_rows is None else body.max_rows
    if not 0 < max_rows <= cap:
        return error(400, "bad_request", f"max_rows must be 1..{cap}")
    limits = replace(ctx.limits, max_rows=max_rows)
    result = run_readonly(store, body.sql, limits, Access(who.scopes))
    return Response(orjson.dumps(result.to_json(), default=str), media_type="application/json")


@router.get(
    "/export",
    summary="Predictions or errors as CSV, JSON lines or Parquet (analyst)",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "the file, streamed",
            "content": {media: {"schema": {"type": "string"}} for media in MEDIA_TYPES.values()},
        },
        **responses(400, 503),
    },
)
@audited("export", target="what")
def export_file(
    request: Request,
    ctx: Context,
    who: Analyst,
    what: Literal["predictions", "errors"] = "predictions",
    sensors: Annotated[str, Query(description="a sensor pattern (`*`, `?`)")] = "*",
    start: Annotated[Time, Query(alias="from", description="readings at or after")] = None,
    stop: Annotated[Time, Query(alias="to", description="readings before")] = None,
    fmt: Annotated[Literal["csv", "json", "parquet"], Query(alias="format")] = "csv",
) -> StreamingResponse:
    """Counted first (over the row cap: 400 ``export_too_large``), then streamed."""
    bounds = {k: v for k, v in (("from", start), ("to", stop)) if v is not None}
    note(request, target=what, sensors=sensors, format=fmt, **bounds)
    store = need(ctx.store, "the store")
    wanted = ExportRequest(what=what, sensors=sensors, start=start, stop=stop, fmt=fmt)
    chunks = export(store, wanted, Access(who.scopes), ctx.export_max_rows, ctx.export_timeout)
    return StreamingResponse(chunks, media_type=MEDIA_TYPES[fmt])

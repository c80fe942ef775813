"""Routes without credentials: liveness, readiness, Prometheus metrics, the dashboard."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from starlette.responses import HTMLResponse, JSONResponse, Response

from forecast import metrics
from gateway.api.context import Context
from gateway.api.schemas import Health, Ready

router = APIRouter()
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"  # the text exposition format


@router.get("/healthz", summary="Alive")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    summary="Broker, store and model ready",
    response_model=Ready,
    responses={503: {"model": Ready, "description": "not ready: the failing checks are false"}},
)
async def readyz(ctx: Context) -> Response:
    results = {name: await check() for name, check in ctx.checks.items()}
    ready = all(results.values())
    return JSONResponse({"ready": ready, "checks": results}, 200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics_endpoint() -> Response:
    return Response(metrics.render(), media_type=PROMETHEUS)


@router.get("/", include_in_schema=False)
def dashboard() -> HTMLResponse:
    """The live dashboard (read from the package in the threadpool)."""
    return HTMLResponse(resources.files("gateway").joinpath("static/index.html").read_text())

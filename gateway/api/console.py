"""What the operator's console (the dashboard) reads: who the caller is, the pipeline's
health, the model leaderboard, drift events, and sensors searched, sorted and paged,
each with its recent actuals, model stretches and online error.

Health numbers come from this process's metrics registry (the worker's, when it runs in
this process, as in ``forecast up``); everything else from the hub (live forecasts) and
the store. Every route needs a viewer; patterns are globs (``*``, ``?``) over
``[A-Za-z0-9_.:-]``, pages and time ranges are bounded.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from forecast import metrics
from forecast.schemas import iso
from gateway.api.console_schemas import (
    RATE_WINDOW,
    Actuals,
    BatchTime,
    DriftEventOut,
    DriftEvents,
    Leaderboard,
    LeaderRow,
    Me,
    OnlineError,
    Overview,
    Pipeline,
    SensorDetail,
    SensorPage,
    SensorRow,
    Serving,
    StoredError,
    Stretch,
)
from gateway.api.context import Context, Viewer, need
from gateway.api.errors import error, responses
from gateway.api.schemas import Forecast, ModelVersion, Time
from gateway.auth import Principal
from models.registry import Registry
from sinks.clickhouse import Store
from sinks.query import Access, glob_to_like
from sinks.schema import DATABASE

router = APIRouter(tags=["console"])

GLOB = r"^[A-Za-z0-9_.:*?-]{1,200}$"
SENSOR = r"^[A-Za-z0-9_.:-]{1,200}$"
MAX_RANGE = timedelta(days=400)  # the widest time range a console route reads
ONLINE_TTL = 1.0  # seconds the per-sensor gauges are read once for (the worker's cadence)
HEALTH = (  # the metrics the overview reads (not the per-sensor ones: 10,000s of series)
    metrics.READINGS,
    metrics.PREDICTIONS,
    metrics.CONSUMER_LAG,
    metrics.BATCH_SECONDS,
    metrics.FALLBACKS,
    metrics.WS_CONNECTIONS,
    metrics.DRIFT_EVENTS,
    metrics.MODEL_INFO,
)
Glob = Annotated[str, Query(description="a sensor pattern (`*`, `?`)", pattern=GLOB)]
SensorId = Annotated[str, Path(description="e.g. `ETTh1.OT`", pattern=SENSOR)]
Start = Annotated[Time, Query(alias="from", description="at or after (RFC 3339)")]
Stop = Annotated[Time, Query(alias="to", description="before (RFC 3339)")]


@router.get("/me", summary="The caller: role, scopes and what it may do")
async def me(who: Viewer) -> Me:
    return Me(
        key_id=who.key_id,
        role=who.role,
        scopes=list(who.scopes),
        can={"sql": who.can("analyst"), "models": who.can("operator"), "keys": who.can("admin")},
    )


@router.get("/overview", summary="Pipeline health, the serving models, live sensors")
def overview(request: Request, ctx: Context, who: Viewer) -> Overview:
    families = {family.name: family for metric in HEALTH for family in metric.collect()}
    totals = _totals(families)
    rates = _rates(request, totals)
    live = 0 if ctx.hub is None else sum(1 for s in ctx.hub.latest if who.sees(s))
    return Overview(
        at=iso(time.time()),
        pipeline=Pipeline(
            readings_per_second=rates[0],
            predictions_per_second=rates[1],
            readings_total=int(totals[0]),
            dead_letters=_by_label(families, "forecast_readings", "reason", result="rejected"),
            consumer_lag=int(sum(v for _, v in _samples(families, "forecast_consumer_lag"))),
            batch=_batch_time(families),
            fallbacks=_by_label(families, "forecast_fallbacks", "reason"),
            subscribers=int(sum(v for _, v in _samples(families, "forecast_ws_connections"))),
            predictions=_by_label(families, "forecast_predictions", "model"),
            drift_events=int(
                sum(v for _, v in _samples(families, "forecast_drift_events", "_total"))
            ),
            worker_in_process=any(_samples(families, "forecast_batch_seconds", "_count")),
        ),
        serving=[
            Serving(name=labels["name"], version=int(labels["version"]), stage=labels["stage"])
            for labels, value in _samples(families, "forecast_model_info")
            if value == 1
        ],
        sensors=live,
    )


@router.get(
    "/leaderboard",
    summary="Models on the same residuals: production, shadow and the fallback",
    response_model=Leaderboard,
    responses=responses(400, 503),
)
def leaderboard(
    ctx: Context, who: Viewer, start: Start = None, stop: Stop = None
) -> Leaderboard | Response:
    store = need(ctx.store, "the store")
    registry = need(ctx.registry, "the model registry")
    if stop is None:
        stop = _latest(store, "readings_log") + timedelta(seconds=1)
    if start is None:
        start = stop - timedelta(days=7)
    if (bad := _bad_range(start, stop)) is not None:
        return bad
    scope = Access(who.scopes).sensor_filter()
    params = {"start": start, "stop": stop}
    where = (
        "target_ts >= {start:DateTime64(3, 'UTC')} AND target_ts < {stop:DateTime64(3, 'UTC')}"
        f" AND {scope}"
    )
    shadow = store.query(
        f"SELECT count() FROM {DATABASE}.prediction_steps WHERE stage = 'shadow' AND {where}",
        params,
    )[0][0]
    paired = ""
    if shadow:
        paired = (
            " AND (sensor_id, target_ts, horizon) IN (SELECT sensor_id, target_ts, horizon "
            f"FROM {DATABASE}.prediction_steps WHERE stage = 'shadow' AND {where})"
        )
    rows = store.query(
        "SELECT model, model_version, count(), uniqExact(sensor_id), avg(abs(error)), "
        f"avg(covered) FROM {DATABASE}.forecast_errors WHERE {where}{paired} "
        "GROUP BY model, model_version ORDER BY avg(abs(error)) LIMIT 100",
        params,
    )
    versions = registry.versions()
    stages = {(m["name"], m["version"]): m["stage"] for m in versions}
    return Leaderboard(
        start=iso(start.timestamp()),
        stop=iso(stop.timestamp()),
        paired=bool(shadow),
        rows=[
            LeaderRow(
                model=model,
                model_version=version,
                stage="baseline"
                if model == "baseline"
                else stages.get((model, version), "unknown"),
                steps=steps,
                sensors=sensors,
                mae=_finite(mae),
                coverage=_finite(coverage),
            )
            for model, version, steps, sensors, mae, coverage in rows
        ],
        models=[ModelVersion.model_validate(m) for m in versions],
    )


@router.get(
    "/drift",
    summary="Drift events, newest first (the timeline)",
    response_model=DriftEvents,
    responses=responses(400, 503),
)
def drift(
    ctx: Context,
    who: Viewer,
    sensors: Glob = "*",
    start: Start = None,
    stop: Stop = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> DriftEvents | Response:
    if start is not None and stop is not None and (bad := _bad_range(start, stop)) is not None:
        return bad
    events = _drift_events(need(ctx.store, "the store"), who, sensors, start, stop, limit)
    return DriftEvents(events=events)


@router.get(
    "/console/sensors",
    summary="Live sensors matching a pattern, sorted and paged",
    responses=responses(400, 503),
)
def sensor_page(
    ctx: Context,
    who: Viewer,
    match: Glob = "*",
    sort: Annotated[
        Literal["sensor", "error", "drift"],
        Query(description="by id, worst online error first, or most recent drift first"),
    ] = "sensor",
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> SensorPage:
    latest = need(ctx.hub, "the live feed").latest
    found = sorted(s for s in list(latest) if who.sees(s) and fnmatchcase(s, match))
    drifts = {} if ctx.store is None else _last_drift(ctx.store, who, glob_to_like(match))
    errors = _online_step_one()
    if sort == "error":  # worst first; sensors without residuals yet last

        def worst(sensor: str) -> float:
            message = latest.get(sensor)
            error = None if message is None else errors.get((sensor, message["model"]))
            return -math.inf if error is None else error[0]

        found.sort(key=worst, reverse=True)  # stable: ties stay in id order
    elif sort == "drift":
        found.sort(key=lambda sensor: drifts.get(sensor, ("", 0))[0], reverse=True)
    rows = []
    for sensor in found[offset : offset + limit]:  # objects for the page only
        message = latest.get(sensor)
        if message is None:
            continue
        mae, coverage = errors.get((sensor, message["model"]), (None, None))
        last, count = drifts.get(sensor, (None, 0))
        rows.append(
            SensorRow(
                sensor_id=sensor,
                seq=message["seq"],
                ts=message["ts"],
                model=message["model"],
                model_version=message["model_version"],
                next=_finite(message["yhat"][0]) if message.get("yhat") else None,
                online_mae=mae,
                online_coverage=coverage,
                last_drift=last,
                drift_events=count,
            )
        )
    return SensorPage(total=len(found), offset=offset, sensors=rows)


@router.get(
    "/console/sensors/{sensor_id}",
    summary="A sensor's actuals, model stretches, drift and error over a range",
    response_model=SensorDetail,
    responses=responses(400, 404, 503),
)
def sensor_detail(
    ctx: Context,
    who: Viewer,
    sensor_id: SensorId,
    start: Start = None,
    stop: Stop = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="latest readings at most")] = 500,
) -> SensorDetail | Response:
    if not who.sees(sensor_id):
        return error(404, "not_found", f"no sensor {sensor_id!r}")
    if start is not None and stop is not None and (bad := _bad_range(start, stop)) is not None:
        return bad
    store = need(ctx.store, "the store")
    where, params = _range("ts", start, stop)
    params["sensor"] = sensor_id
    readings = store.query(
        f"SELECT toFloat64(ts), value FROM {DATABASE}.readings "
        f"WHERE sensor_id = {{sensor:String}}{where} ORDER BY ts DESC LIMIT {limit + 1}",
        params,
    )
    truncated = len(readings) > limit
    readings = readings[:limit][::-1]
    since = start
    if since is None and readings:  # the rest follows the readings shown
        since = datetime.fromtimestamp(readings[0][0], UTC)
    message = None if ctx.hub is None else ctx.hub.latest.get(sensor_id)
    return SensorDetail(
        sensor_id=sensor_id,
        actuals=Actuals(ts=[r[0] for r in readings], value=[r[1] for r in readings]),
        truncated=truncated,
        forecast=None if message is None else Forecast.model_validate(message),
        stretches=_stretches(store, sensor_id, since, stop, _production_intervals(ctx.registry)),
        drift=_drift_events(store, who, sensor_id, since, stop, 1000)[::-1],
        online=[
            OnlineError(model=model, horizon=horizon, mae=mae, coverage=coverage)
            for (sensor, model, horizon), (mae, coverage) in sorted(_online().items())
            if sensor == sensor_id
        ],
        errors=_stored_error(store, sensor_id, since, stop),
    )


# -- helpers ------------------------------------------------------------------------------


def _samples(
    families: dict[str, Any], name: str, suffix: str = ""
) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of the samples named ``name + suffix`` of metric family ``name``."""
    family = families.get(name)
    if family is None:
        return []
    wanted = name + suffix
    return [(s.labels, s.value) for s in family.samples if s.name == wanted]


def _by_label(families: dict[str, Any], name: str, label: str, **only: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for labels, value in _samples(families, name, "_total"):
        if all(labels.get(k) == v for k, v in only.items()) and value:
            out[labels.get(label, "")] = out.get(labels.get(label, ""), 0) + int(value)
    return out


def _totals(families: dict[str, Any]) -> tuple[float, float]:
    accepted = sum(
        v
        for labels, v in _samples(families, "forecast_readings", "_total")
        if labels.get("result") == "accepted"
    )
    predicted = sum(v for _, v in _samples(families, "forecast_predictions", "_total"))
    return accepted, predicted


def _rates(request: Request, totals: tuple[float, float]) -> tuple[float, float]:
    """Readings/s and predictions/s since the oldest sample of the last RATE_WINDOW seconds
    (each overview call adds one; the first call answers 0)."""
    history: deque[tuple[float, tuple[float, float]]] | None = getattr(
        request.app.state, "console_rates", None
    )
    if history is None:
        history = request.app.state.console_rates = deque(maxlen=256)
    now = time.monotonic()
    history.append((now, totals))
    while len(history) > 2 and now - history[1][0] >= RATE_WINDOW:
        history.popleft()
    then, old = history[0]
    if now - then <= 0:
        return 0.0, 0.0
    return tuple(max(0.0, (new - was) / (now - then)) for new, was in zip(totals, old, strict=True))  # type: ignore[return-value]


def _batch_time(families: dict[str, Any]) -> BatchTime:
    count = sum(v for _, v in _samples(families, "forecast_batch_seconds", "_count"))
    total = sum(v for _, v in _samples(families, "forecast_batch_seconds", "_sum"))
    buckets = sorted(
        (float(labels["le"]), v)
        for labels, v in _samples(families, "forecast_batch_seconds", "_bucket")
    )
    p95 = next((le for le, cumulative in buckets if cumulative >= 0.95 * count), None)
    return BatchTime(
        count=int(count),
        mean_seconds=total / count if count else None,
        p95_seconds=p95 if count and p95 is not None and math.isfinite(p95) else None,
    )


_online_cache: tuple[float, dict] = (-math.inf, {})
_online_lock = threading.Lock()


def _online() -> dict[tuple[str, str, int], tuple[float, float | None]]:
    """(sensor, model, horizon) → (online MAE, coverage), from the worker's gauges, read
    at most once every ONLINE_TTL seconds (reading 30,000 series takes a while)."""
    global _online_cache
    with _online_lock:
        at, found = _online_cache
        if time.monotonic() - at >= ONLINE_TTL:
            found = _read_online()
            _online_cache = (time.monotonic(), found)
    return found


def _read_online() -> dict[tuple[str, str, int], tuple[float, float | None]]:
    coverage = metrics.gauge_values(metrics.ONLINE_COVERAGE)
    out = {}
    for (sensor, model, horizon), mae in metrics.gauge_values(metrics.ONLINE_MAE).items():
        if math.isfinite(mae) and horizon.isdigit():
            out[(sensor, model, int(horizon))] = (
                mae,
                _finite(coverage.get((sensor, model, horizon))),
            )
    return out


def _online_step_one() -> dict[tuple[str, str], tuple[float, float | None]]:
    """(sensor, model) → the smallest tracked step's online MAE and coverage."""
    best: dict[tuple[str, str], tuple[int, float, float | None]] = {}
    for (sensor, model, horizon), (mae, coverage) in _online().items():
        if (sensor, model) not in best or horizon < best[(sensor, model)][0]:
            best[(sensor, model)] = (horizon, mae, coverage)
    return {key: (mae, coverage) for key, (_, mae, coverage) in best.items()}


def _last_drift(store: Store, who: Principal, like: str) -> dict[str, tuple[str, int]]:
    rows = store.query(
        f"SELECT sensor_id, toFloat64(max(ts)), count() FROM {DATABASE}.drift_events "
        f"WHERE sensor_id LIKE {{like:String}} AND {Access(who.scopes).sensor_filter()} "
        "GROUP BY sensor_id",
        {"like": like},
    )
    return {sensor: (iso(at), count) for sensor, at, count in rows}


def _drift_events(
    store: Store,
    who: Principal,
    pattern: str,
    start: datetime | None,
    stop: datetime | None,
    limit: int,
) -> list[DriftEventOut]:
    where, params = _range("ts", start, stop)
    params["like"] = glob_to_like(pattern)
    rows = store.query(
        "SELECT sensor_id, toFloat64(ts), detector, signal, model, model_version, detail "
        f"FROM {DATABASE}.drift_events WHERE sensor_id LIKE {{like:String}} "
        f"AND {Access(who.scopes).sensor_filter()}{where} "
        f"ORDER BY ts DESC, sensor_id LIMIT {int(limit)}",
        params,
    )
    return [
        DriftEventOut(
            sensor_id=sensor,
            ts=iso(ts),
            detector=detector,
            signal=signal,
            model=model,
            model_version=version,
            detail=_detail(detail),
        )
        for sensor, ts, detector, signal, model, version, detail in rows
    ]


def _stretches(
    store: Store,
    sensor_id: str,
    start: datetime | None,
    stop: datetime | None,
    serving: list[tuple[float, float]],
) -> list[Stretch]:
    """Runs of published forecasts by one model version (at most the latest 500); the
    baseline's forecasts issued while a production model was set (``serving``, wall-time
    intervals) are fallbacks, a run of their own."""
    where, params = _range("ts", start, stop)
    params["sensor"] = sensor_id
    rows = store.query(
        f"SELECT toFloat64(ts), toFloat64(issued_at), model, model_version "
        f"FROM {DATABASE}.predictions "
        f"WHERE sensor_id = {{sensor:String}} AND stage = 'production'{where} "
        "ORDER BY ts LIMIT 100000",
        params,
    )
    out: list[Stretch] = []
    for ts, issued, model, version in rows:
        fallback = model == "baseline" and any(a <= issued < b for a, b in serving)
        if out and (out[-1].model, out[-1].model_version, out[-1].fallback) == (
            model,
            version,
            fallback,
        ):
            out[-1].stop = iso(ts)
            out[-1].forecasts += 1
        else:
            out.append(
                Stretch(
                    model=model,
                    model_version=version,
                    start=iso(ts),
                    stop=iso(ts),
                    forecasts=1,
                    fallback=fallback,
                )
            )
    return out[-500:]


def _production_intervals(registry: Registry | None) -> list[tuple[float, float]]:
    """Wall-time intervals during which the registry had a production model."""
    if registry is None:
        return []
    state = registry.state()
    spans = [
        (float(h["since"]), float(h["until"]))
        for h in state.get("history", [])
        if h.get("stage") == "production" and "since" in h and "until" in h
    ]
    current = state.get("production")
    if current and "since" in current:
        spans.append((float(current["since"]), math.inf))
    return spans


def _stored_error(
    store: Store, sensor_id: str, start: datetime | None, stop: datetime | None
) -> StoredError:
    """Step 1 of the published forecasts issued in the range, against the actuals."""
    where, params = _range("p.ts", start, stop)
    params["sensor"] = sensor_id
    steps, mae, coverage = store.query(
        "SELECT count(), avg(abs(r.value - p.yhat)), "
        "avg(r.value >= p.lower AND r.value <= p.upper) "
        f"FROM {DATABASE}.prediction_steps AS p INNER JOIN {DATABASE}.readings AS r "
        "ON p.sensor_id = r.sensor_id AND p.target_ts = r.ts "
        "WHERE p.sensor_id = {sensor:String} AND p.stage = 'production' AND p.horizon = 1" + where,
        params,
    )[0]
    return StoredError(
        steps=steps,
        mae=_finite(mae) if steps else None,
        coverage=_finite(coverage) if steps else None,
    )


def _range(column: str, start: datetime | None, stop: datetime | None) -> tuple[str, dict]:
    where, params = "", {}
    if start is not None:
        where += f" AND {column} >= {{start:DateTime64(3, 'UTC')}}"
        params["start"] = start
    if stop is not None:
        where += f" AND {column} < {{stop:DateTime64(3, 'UTC')}}"
        params["stop"] = stop
    return where, params


def _bad_range(start: datetime, stop: datetime) -> Response | None:
    if stop <= start:
        return error(400, "bad_request", "to: must be after from")
    if stop - start > MAX_RANGE:
        return error(400, "bad_request", f"to: at most {MAX_RANGE.days} days after from")
    return None


def _latest(store: Store, table: str) -> datetime:
    """The newest ``ts`` in ``table`` (now when it is empty)."""
    ((newest, count),) = store.query(  # no FINAL: a repeat changes neither
        f"SELECT toFloat64(max(ts)), count() > 0 FROM {DATABASE}.{table}", settings={"final": 0}
    )
    return datetime.fromtimestamp(newest if count else time.time(), UTC)


def _detail(text: str) -> dict[str, Any]:
    try:
        found = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"text": text}
    return found if isinstance(found, dict) else {"value": found}


def _finite(value: object) -> float | None:
    if value is None:
        return None
    number = float(value)  # type: ignore[arg-type]
    return number if math.isfinite(number) else None

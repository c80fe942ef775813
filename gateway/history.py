"""Predictions a resuming client missed that the gateway no longer holds in memory,
read back from ClickHouse exactly as they were published.

The sink stores a prediction shortly after it was published (it is a consumer of its
own), so a gap that ends at a known ``seq`` may not be in the store in full yet: it is
read again until it is, for at most ``CATCH_UP`` seconds."""

from __future__ import annotations

import time
from datetime import datetime

import orjson

from forecast.schemas import Prediction
from sinks.clickhouse import Store
from sinks.schema import DATABASE

MAX_RESUME = 10_000  # predictions per resume from the store
CATCH_UP = 5.0  # seconds to wait for the sink to store a gap in full

Gaps = dict[str, tuple[int, int | None]]  # sensor -> (after seq, before seq or None)


def missed(store: Store, gaps: Gaps) -> list[tuple[str, int, bytes]]:
    """Published predictions with ``after < seq < before`` per sensor, in seq order."""
    deadline = time.monotonic() + CATCH_UP
    while True:
        found = _stored(store, gaps)
        if _complete(found, gaps) or time.monotonic() > deadline or len(found) >= MAX_RESUME:
            return found
        time.sleep(0.1)


def _complete(found: list[tuple[str, int, bytes]], gaps: Gaps) -> bool:
    """Whether every gap with a known end is there in full (``seq`` counts up by one)."""
    counts: dict[str, int] = {}
    for sensor, _, _ in found:
        counts[sensor] = counts.get(sensor, 0) + 1
    return all(
        counts.get(sensor, 0) >= before - after - 1
        for sensor, (after, before) in gaps.items()
        if before is not None
    )


def _stored(store: Store, gaps: Gaps) -> list[tuple[str, int, bytes]]:
    if not gaps:
        return []
    clauses, params = [], {}
    for i, (sensor, (after, before)) in enumerate(sorted(gaps.items())):
        clause = f"(sensor_id = {{s{i}:String}} AND seq > {{a{i}:Int64}}"
        params[f"s{i}"], params[f"a{i}"] = sensor, after
        if before is not None:
            clause += f" AND seq < {{b{i}:UInt64}}"
            params[f"b{i}"] = before
        clauses.append(clause + ")")
    sql = f"""
        SELECT sensor_id, seq, toFloat64(ts), toFloat64(issued_at), model, model_version,
               step_seconds, yhat, lower, upper
        FROM {DATABASE}.predictions
        WHERE stage = 'production' AND ({" OR ".join(clauses)})
        ORDER BY sensor_id, seq
        LIMIT {MAX_RESUME}"""
    out = []
    for sensor, seq, at, issued, model, version, step, yhat, lower, upper in store.query(
        sql, params
    ):
        prediction = Prediction(sensor, at, issued, model, version, step, yhat, lower, upper, seq)
        out.append((sensor, seq, orjson.dumps(prediction.to_message())))
    return out


def forecast_history(
    store: Store, sensor_id: str, start: datetime | None, stop: datetime | None, limit: int
) -> list[dict]:
    """Published forecasts of a sensor issued for readings in [start, stop), newest first."""
    where, params = ["sensor_id = {sensor:String}", "stage = 'production'"], {"sensor": sensor_id}
    if start is not None:
        where.append("ts >= {start:DateTime64(3, 'UTC')}")
        params["start"] = start
    if stop is not None:
        where.append("ts < {stop:DateTime64(3, 'UTC')}")
        params["stop"] = stop
    sql = f"""
        SELECT seq FROM {DATABASE}.predictions WHERE {" AND ".join(where)}
        ORDER BY seq DESC LIMIT {int(limit)}"""
    seqs = [row[0] for row in store.query(sql, params)]
    if not seqs:
        return []
    found = missed(store, {sensor_id: (min(seqs) - 1, max(seqs) + 1)})
    return [orjson.loads(payload) for _, _, payload in reversed(found)]

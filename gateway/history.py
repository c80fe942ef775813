"""Predictions a resuming client missed that the gateway no longer holds in memory,
read back from ClickHouse exactly as they were published."""

from __future__ import annotations

from datetime import datetime

import orjson

from forecast.schemas import Prediction
from sinks.clickhouse import Store
from sinks.schema import DATABASE

MAX_RESUME = 10_000  # predictions per resume from the store

Gaps = dict[str, tuple[int, int | None]]  # sensor -> (after seq, before seq or None)


def missed(store: Store, gaps: Gaps) -> list[tuple[str, int, bytes]]:
    """Published predictions with ``after < seq < before`` per sensor, in seq order."""
    if not gaps:
        return []
    clauses, params = [], {}
    for i, (sensor, (after, before)) in enumerate(sorted(gaps.items())):
        clause = f"(sensor_id = {{s{i}:String}} AND seq > {{a{i}:UInt64}}"
        params[f"s{i}"], params[f"a{i}"] = sensor, after
        if before is not None:
            clause += f" AND seq < {{b{i}:UInt64}}"
            params[f"b{i}"] = before
        clauses.append(clause + ")")
    sql = f"""
        SELECT sensor_id, seq, toFloat64(ts) AS at, toFloat64(any(issued_at)) AS issued,
               model, model_version,
               dateDiff('millisecond', ts, anyIf(target_ts, horizon = 1)) / 1000 AS step,
               arraySort(x -> x.1, groupArray((horizon, yhat, lower, upper))) AS steps
        FROM {DATABASE}.predictions
        WHERE stage = 'production' AND ({" OR ".join(clauses)})
        GROUP BY sensor_id, seq, ts, model, model_version
        ORDER BY sensor_id, seq
        LIMIT {MAX_RESUME}"""
    out = []
    for sensor, seq, at, issued, model, version, step, steps in store.query(sql, params):
        prediction = Prediction(
            sensor,
            at,
            issued,
            model,
            version,
            step,
            [s[1] for s in steps],
            [s[2] for s in steps],
            [s[3] for s in steps],
            seq,
        )
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
        GROUP BY seq ORDER BY seq DESC LIMIT {int(limit)}"""
    seqs = [row[0] for row in store.query(sql, params)]
    if not seqs:
        return []
    found = missed(store, {sensor_id: (min(seqs) - 1, max(seqs) + 1)})
    return [orjson.loads(payload) for _, _, payload in reversed(found)]

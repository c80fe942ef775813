"""Versioned migrations of database `forecast`; the same SQL runs on chDB and a server.

Rows land in ``*_log`` tables: ReplacingMergeTree on deterministic keys, where identical
re-inserts are dropped by insert deduplication tokens and any other repeat (a batch
re-delivered after a crash, cut differently) collapses on the key once parts merge.
Everything anyone reads is a view over them with ``FINAL`` (``readings``, ``predictions``,
``drift_events`` and the analyst views on those), so a repeat is never visible, with or
without ``FINAL`` in the query. Analysts' SQL may not name the ``*_log`` tables.
"""

from __future__ import annotations

DATABASE = "forecast"


def migrations(retention_days: int) -> list[tuple[int, str, list[str]]]:
    """(version, description, statements) in the order they apply."""

    def ttl(column: str) -> str:
        # Retention counts from when a row was stored, not from the sensor's own time:
        # replayed history (ETTh1 is from 2016) would otherwise expire on insert.
        return f"TTL toDateTime({column}) + INTERVAL {int(retention_days)} DAY"

    settings = "SETTINGS non_replicated_deduplication_window = 10000"
    return [
        (
            1,
            "readings, predictions and drift_events tables",
            [
                f"""CREATE TABLE IF NOT EXISTS {DATABASE}.readings (
                    sensor_id LowCardinality(String),
                    ts DateTime64(3, 'UTC'),
                    value Float64,
                    covariates Map(LowCardinality(String), Float64),
                    ingested_at DateTime64(3, 'UTC')
                ) ENGINE = ReplacingMergeTree(ingested_at)
                PARTITION BY toYYYYMM(ts) ORDER BY (sensor_id, ts) {ttl("ingested_at")}
                {settings}""",
                f"""CREATE TABLE IF NOT EXISTS {DATABASE}.predictions (
                    sensor_id LowCardinality(String),
                    ts DateTime64(3, 'UTC'),
                    target_ts DateTime64(3, 'UTC'),
                    horizon UInt16,
                    yhat Float64,
                    lower Float64,
                    upper Float64,
                    model LowCardinality(String),
                    model_version UInt32,
                    issued_at DateTime64(3, 'UTC'),
                    seq UInt64
                ) ENGINE = ReplacingMergeTree(issued_at)
                PARTITION BY toYYYYMM(ts)
                ORDER BY (sensor_id, model, model_version, ts, horizon) {ttl("issued_at")}
                {settings}""",
                f"""CREATE TABLE IF NOT EXISTS {DATABASE}.drift_events (
                    sensor_id LowCardinality(String),
                    ts DateTime64(3, 'UTC'),
                    detector LowCardinality(String),
                    signal LowCardinality(String),
                    model LowCardinality(String),
                    model_version UInt32,
                    detail String,
                    detected_at DateTime64(3, 'UTC') DEFAULT now64(3)
                ) ENGINE = ReplacingMergeTree
                PARTITION BY toYYYYMM(ts) ORDER BY (sensor_id, ts, detector, signal)
                {ttl("detected_at")}
                {settings}""",
            ],
        ),
        (
            2,
            "forecast_errors view: each prediction step beside the actual at target_ts",
            [
                f"""CREATE VIEW IF NOT EXISTS {DATABASE}.forecast_errors AS
                SELECT p.sensor_id AS sensor_id, p.ts AS ts, p.target_ts AS target_ts,
                       p.horizon AS horizon, p.model AS model,
                       p.model_version AS model_version, p.yhat AS yhat,
                       p.lower AS lower, p.upper AS upper, r.value AS actual,
                       r.value - p.yhat AS error,
                       r.value >= p.lower AND r.value <= p.upper AS covered
                FROM {DATABASE}.predictions AS p FINAL
                INNER JOIN {DATABASE}.readings AS r FINAL
                    ON p.sensor_id = r.sensor_id AND p.target_ts = r.ts""",
            ],
        ),
        (
            3,
            "model_leaderboard (parameterised by a time range) and drift_timeline views",
            [
                f"""CREATE VIEW IF NOT EXISTS {DATABASE}.model_leaderboard AS
                SELECT model, model_version, count() AS steps,
                       uniqExact(sensor_id) AS sensors,
                       avg(abs(error)) AS mae, avg(error * error) AS mse,
                       avg(covered) AS coverage
                FROM {DATABASE}.forecast_errors
                WHERE target_ts >= {{start:DateTime64(3, 'UTC')}}
                  AND target_ts < {{stop:DateTime64(3, 'UTC')}}
                GROUP BY model, model_version
                ORDER BY mse""",
                f"""CREATE VIEW IF NOT EXISTS {DATABASE}.drift_timeline AS
                SELECT toStartOfHour(ts) AS hour, sensor_id, detector, signal, model,
                       model_version, count() AS events, any(detail) AS example
                FROM {DATABASE}.drift_events FINAL
                GROUP BY hour, sensor_id, detector, signal, model, model_version
                ORDER BY hour, sensor_id""",
            ],
        ),
        (
            4,
            "predictions.stage: production (published) or shadow (stored only)",
            [
                f"""ALTER TABLE {DATABASE}.predictions
                ADD COLUMN IF NOT EXISTS stage LowCardinality(String) DEFAULT 'production'""",
            ],
        ),
        (
            5,
            "model_decisions: every step of the drift-to-retrain loop",
            [
                f"""CREATE TABLE IF NOT EXISTS {DATABASE}.model_decisions (
                    at DateTime64(3, 'UTC'),
                    action LowCardinality(String),
                    model LowCardinality(String),
                    model_version UInt32,
                    detail String
                ) ENGINE = ReplacingMergeTree
                PARTITION BY toYYYYMM(at) ORDER BY (at, action, model, model_version)
                {settings}""",
            ],
        ),
        (
            6,
            "rows into *_log tables; readings, predictions, drift_events: de-duplicating views",
            _deduplicating_views(),
        ),
        (
            7,
            "predictions: one row per prediction with arrays; prediction_steps: one per step; "
            "source offsets for the sink",
            _prediction_arrays(ttl("issued_at"), settings),
        ),
        (
            8,
            "audit_log: every change and analyst query, append-only (sinks.audit)",
            [
                f"""CREATE TABLE IF NOT EXISTS {DATABASE}.audit_log (
                    at DateTime64(3, 'UTC'),
                    actor String,
                    role LowCardinality(String),
                    action LowCardinality(String),
                    target String,
                    result LowCardinality(String),
                    request_id String,
                    detail String
                ) ENGINE = MergeTree
                PARTITION BY toYYYYMM(at) ORDER BY at""",
            ],
        ),
    ]


LOG_TABLES = {
    "readings": "readings_log",
    "predictions": "predictions_log",
    "drift_events": "drift_events_log",
}
"""Each table that rows are inserted into, by the name of the view analysts read."""

VIEW_COLUMNS = {
    "readings": "sensor_id, ts, value, covariates, ingested_at",
    "predictions": "sensor_id, ts, issued_at, model, model_version, stage, step_seconds, yhat, "
    "lower, upper, seq",
    "drift_events": "sensor_id, ts, detector, signal, model, model_version, detail, detected_at",
}
STEP_COLUMNS = (
    "sensor_id, ts, target_ts, horizon, yhat, lower, upper, model, model_version, issued_at, "
    "seq, stage"
)
"""The columns of ``prediction_steps`` (``predictions`` before migration 7)."""


def _deduplicating_views() -> list[str]:
    renames = ", ".join(
        f"{DATABASE}.{view} TO {DATABASE}.{table}" for view, table in LOG_TABLES.items()
    )
    statements = [f"RENAME TABLE {renames}"]
    columns = {**VIEW_COLUMNS, "predictions": STEP_COLUMNS}  # as migration 6 made them
    statements += [
        f"CREATE VIEW {DATABASE}.{view} AS SELECT {columns[view]} FROM {DATABASE}.{table} FINAL"
        for view, table in LOG_TABLES.items()
    ]
    statements += [
        _forecast_errors("predictions"),
        f"""CREATE OR REPLACE VIEW {DATABASE}.drift_timeline AS
        SELECT toStartOfHour(ts) AS hour, sensor_id, detector, signal, model,
               model_version, count() AS events, any(detail) AS example
        FROM {DATABASE}.drift_events
        GROUP BY hour, sensor_id, detector, signal, model, model_version
        ORDER BY hour, sensor_id""",
    ]
    return statements


def _forecast_errors(steps: str) -> str:
    return f"""CREATE OR REPLACE VIEW {DATABASE}.forecast_errors AS
        SELECT p.sensor_id AS sensor_id, p.ts AS ts, p.target_ts AS target_ts,
               p.horizon AS horizon, p.model AS model,
               p.model_version AS model_version, p.yhat AS yhat,
               p.lower AS lower, p.upper AS upper, r.value AS actual,
               r.value - p.yhat AS error,
               r.value >= p.lower AND r.value <= p.upper AS covered
        FROM {DATABASE}.{steps} AS p
        INNER JOIN {DATABASE}.readings AS r
            ON p.sensor_id = r.sensor_id AND p.target_ts = r.ts"""


def _prediction_arrays(ttl: str, settings: str) -> list[str]:
    """Predictions as the contract has them (arrays), the per-step shape as a view, and
    the store's rows converted in place."""
    by_step = "arrayMap(x -> x.2, arraySort(x -> x.1, groupArray((horizon, {0}))))"
    return [
        f"RENAME TABLE {DATABASE}.predictions_log TO {DATABASE}.prediction_steps_v6",
        f"""CREATE TABLE {DATABASE}.predictions_log (
            sensor_id LowCardinality(String),
            ts DateTime64(3, 'UTC'),
            issued_at DateTime64(3, 'UTC'),
            model LowCardinality(String),
            model_version UInt32,
            stage LowCardinality(String),
            step_seconds Float64,
            yhat Array(Float64),
            lower Array(Float64),
            upper Array(Float64),
            seq UInt64,
            src_partition UInt32 DEFAULT 0,
            src_offset UInt64 DEFAULT 0,
            src_timestamp UInt64 DEFAULT 0
        ) ENGINE = ReplacingMergeTree(issued_at)
        PARTITION BY toYYYYMM(ts) ORDER BY (sensor_id, model, model_version, ts) {ttl}
        {settings}""",
        f"""INSERT INTO {DATABASE}.predictions_log
            (sensor_id, ts, issued_at, model, model_version, stage, step_seconds, yhat, lower,
             upper, seq)
        SELECT sensor_id, ts, max(issued_at), model, model_version, any(stage),
               dateDiff('millisecond', ts, min(target_ts)) / min(horizon) / 1000,
               {by_step.format("yhat")}, {by_step.format("lower")}, {by_step.format("upper")},
               any(seq)
        FROM {DATABASE}.prediction_steps_v6 FINAL
        GROUP BY sensor_id, model, model_version, ts""",
        f"""CREATE OR REPLACE VIEW {DATABASE}.predictions AS
        SELECT {VIEW_COLUMNS["predictions"]} FROM {DATABASE}.predictions_log FINAL""",
        f"""CREATE VIEW {DATABASE}.prediction_steps AS
        SELECT sensor_id, ts,
               ts + toIntervalMillisecond(toInt64(round(step * step_seconds * 1000))) AS target_ts,
               toUInt16(step) AS horizon, step_yhat AS yhat, step_lower AS lower,
               step_upper AS upper, model, model_version, issued_at, seq, stage, step_seconds
        FROM {DATABASE}.predictions
        ARRAY JOIN arrayEnumerate(yhat) AS step, yhat AS step_yhat, lower AS step_lower,
                   upper AS step_upper""",
        _forecast_errors("prediction_steps"),
        f"DROP TABLE {DATABASE}.prediction_steps_v6",
        *(
            f"ALTER TABLE {DATABASE}.{table} ADD COLUMN IF NOT EXISTS src_partition UInt32 "
            "DEFAULT 0, ADD COLUMN IF NOT EXISTS src_offset UInt64 DEFAULT 0, "
            "ADD COLUMN IF NOT EXISTS src_timestamp UInt64 DEFAULT 0"
            for table in ("readings_log", "drift_events_log")
        ),
    ]

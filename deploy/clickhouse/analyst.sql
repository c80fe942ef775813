-- A read-only ClickHouse user for the engine's analyst SQL, on a ClickHouse server.
-- Run once as an administrator, change the password, then point the engine at it:
--   FORECAST_CLICKHOUSE_URL=http://forecast:...@clickhouse:8123/forecast          (the sink)
--   FORECAST_CLICKHOUSE_ANALYST_URL=http://forecast_analyst:...@clickhouse:8123/forecast
-- The engine still judges every statement with ClickHouse's parser, sets its caps and
-- readonly = 1 per query, and applies each key's sensor scope with
-- additional_table_filters; this profile is the server's own second lock behind those:
-- the caps cannot be raised past their MAX, and the user can neither write nor run DDL.

CREATE SETTINGS PROFILE IF NOT EXISTS forecast_analyst SETTINGS
    readonly = 2,
    allow_ddl = 0,
    allow_introspection_functions = 0,
    max_memory_usage = 536870912 MAX 536870912,
    max_bytes_to_read = 8589934592 MAX 8589934592,
    max_execution_time = 30 MAX 300,
    max_result_rows = 10001 MAX 2000001;

CREATE USER IF NOT EXISTS forecast_analyst
    IDENTIFIED WITH sha256_password BY 'change-me'
    SETTINGS PROFILE 'forecast_analyst';

-- The views analysts read run as the caller, so the user reads the tables beneath them.
GRANT SELECT ON forecast.* TO forecast_analyst;

-- People who query the server directly, each with a user of their own, get their sensor
-- scope as a row policy on each table of rows (the engine's keys get theirs per query).
-- For example, a user `ett_analyst` limited to the ETTh1 sensors:
--   CREATE ROW POLICY IF NOT EXISTS ett_only ON forecast.readings_log, forecast.predictions_log, forecast.drift_events_log FOR SELECT USING sensor_id LIKE 'ETTh1.%' TO ett_analyst;

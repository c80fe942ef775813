-- ClickHouse's own Kafka engine in place of `forecast sink`, on a ClickHouse server.
--
-- Workers publish each batch's rows as Arrow streams on three topics, one per table
-- (store.readings, store.predictions, store.drift_events; with FORECAST_TOPIC_PREFIX in
-- front, if set). These Kafka tables read them and materialized views write them into the
-- same *_log tables the engine's sink writes, with the partition and the offset after each
-- record and its time, so the views analysts read (readings, predictions, prediction_steps, ...) work
-- unchanged. Run once after the engine has migrated the database (it creates the *_log
-- tables), with kafka_broker_list set to your brokers, and do NOT run `forecast sink` as
-- well: both use the consumer group forecast-sink.
--
-- Records that do not parse are kept in forecast.sink_rejected (kafka_handle_error_mode =
-- 'stream'), never dropped silently. ClickHouse commits a block's offsets after writing
-- it; a block written twice (a restart between the two) collapses on the tables' keys and
-- is never visible twice through the views.

CREATE TABLE IF NOT EXISTS forecast.sink_rejected (
    topic LowCardinality(String),
    partition UInt32,
    offset UInt64,
    error String,
    raw String,
    at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = MergeTree ORDER BY (topic, partition, offset);

CREATE TABLE IF NOT EXISTS forecast.readings_queue (
    sensor_id String,
    ts DateTime64(3, 'UTC'),
    value Float64,
    covariates Map(String, Float64),
    ingested_at DateTime64(3, 'UTC')
) ENGINE = Kafka SETTINGS
    kafka_broker_list = 'kafka:9092',
    kafka_topic_list = 'store.readings',
    kafka_group_name = 'forecast-sink',
    kafka_format = 'ArrowStream',
    kafka_handle_error_mode = 'stream';

CREATE MATERIALIZED VIEW IF NOT EXISTS forecast.readings_consumer TO forecast.readings_log AS
SELECT sensor_id, ts, value, covariates, ingested_at,
       toUInt32(_partition) AS src_partition, _offset + 1 AS src_offset,
       toUInt64(toUnixTimestamp64Milli(coalesce(_timestamp_ms, now64(3)))) AS src_timestamp
FROM forecast.readings_queue WHERE length(_error) = 0;

CREATE TABLE IF NOT EXISTS forecast.predictions_queue (
    sensor_id String,
    ts DateTime64(3, 'UTC'),
    issued_at DateTime64(3, 'UTC'),
    model String,
    model_version UInt32,
    stage String,
    step_seconds Float64,
    yhat Array(Float64),
    lower Array(Float64),
    upper Array(Float64),
    seq UInt64
) ENGINE = Kafka SETTINGS
    kafka_broker_list = 'kafka:9092',
    kafka_topic_list = 'store.predictions',
    kafka_group_name = 'forecast-sink',
    kafka_format = 'ArrowStream',
    kafka_handle_error_mode = 'stream';

CREATE MATERIALIZED VIEW IF NOT EXISTS forecast.predictions_consumer TO forecast.predictions_log AS
SELECT sensor_id, ts, issued_at, model, model_version, stage, step_seconds, yhat, lower, upper,
       seq, toUInt32(_partition) AS src_partition, _offset + 1 AS src_offset,
       toUInt64(toUnixTimestamp64Milli(coalesce(_timestamp_ms, now64(3)))) AS src_timestamp
FROM forecast.predictions_queue WHERE length(_error) = 0;

CREATE TABLE IF NOT EXISTS forecast.drift_events_queue (
    sensor_id String,
    ts DateTime64(3, 'UTC'),
    detector String,
    signal String,
    model String,
    model_version UInt32,
    detail String
) ENGINE = Kafka SETTINGS
    kafka_broker_list = 'kafka:9092',
    kafka_topic_list = 'store.drift_events',
    kafka_group_name = 'forecast-sink',
    kafka_format = 'ArrowStream',
    kafka_handle_error_mode = 'stream';

CREATE MATERIALIZED VIEW IF NOT EXISTS forecast.drift_events_consumer TO forecast.drift_events_log AS
SELECT sensor_id, ts, detector, signal, model, model_version, detail,
       toUInt32(_partition) AS src_partition, _offset + 1 AS src_offset,
       toUInt64(toUnixTimestamp64Milli(coalesce(_timestamp_ms, now64(3)))) AS src_timestamp
FROM forecast.drift_events_queue WHERE length(_error) = 0;

CREATE MATERIALIZED VIEW IF NOT EXISTS forecast.sink_rejects TO forecast.sink_rejected AS
SELECT _topic AS topic, toUInt32(_partition) AS partition, _offset AS offset, _error AS error,
       _raw_message AS raw
FROM merge('forecast', '^(readings|predictions|drift_events)_queue$')
WHERE length(_error) > 0;

"""Prometheus metrics of the worker and the gateway (one registry per process)."""

from __future__ import annotations

import math

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

READINGS = Counter(
    "forecast_readings",
    "Readings by result (accepted, out_of_order, duplicate, too_old_to_correct, "
    "redelivered, rejected) and reject reason.",
    ["result", "reason"],
    registry=REGISTRY,
)
PREDICTIONS = Counter(
    "forecast_predictions", "Predictions published, by model.", ["model"], registry=REGISTRY
)
FORECAST_FAILURES = Counter(
    "forecast_forecast_failures", "Forecasts that failed or were not finite.", registry=REGISTRY
)
BATCH_SECONDS = Histogram(
    "forecast_batch_seconds",
    "Worker time per micro-batch, from hand-over to acknowledgement.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
BATCH_RECORDS = Histogram(
    "forecast_batch_records",
    "Kafka records per micro-batch.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
    registry=REGISTRY,
)
FALLBACKS = Counter(
    "forecast_fallbacks",
    "Predictions served by the baseline instead of the production model, by reason.",
    ["reason"],
    registry=REGISTRY,
)
INFERENCE_SECONDS = Histogram(
    "forecast_inference_seconds",
    "Time of one model step over a micro-batch, by model.",
    ["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
    registry=REGISTRY,
)
INFERENCE_READINGS = Histogram(
    "forecast_inference_readings",
    "Readings in one model step over a micro-batch, by model.",
    ["model"],
    buckets=(1, 10, 50, 100, 500, 1000, 5000, 10000),
    registry=REGISTRY,
)
MODEL_INFO = Gauge(
    "forecast_model_info",
    "The models serving the stream (1 = serving), by name, version and stage.",
    ["name", "version", "stage"],
    registry=REGISTRY,
)
MODEL_LOAD_FAILURES = Counter(
    "forecast_model_load_failures",
    "Model versions refused at load (corrupt or incompatible); the running model stays.",
    registry=REGISTRY,
)
RESIDUAL_ERRORS = Histogram(
    "forecast_residual_abs_error",
    "Absolute forecast error once the actual arrived, by model, stage and horizon step.",
    ["model", "stage", "horizon"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 100),
    registry=REGISTRY,
)
RESIDUAL_COVERED = Counter(
    "forecast_residual_covered",
    "Residuals whose actual fell inside the interval (covered=true) or not.",
    ["model", "stage", "horizon", "covered"],
    registry=REGISTRY,
)
ONLINE_MAE = Gauge(
    "forecast_online_mae",
    "Exponentially weighted absolute error per sensor, model and horizon step.",
    ["sensor_id", "model", "horizon"],
    registry=REGISTRY,
)
ONLINE_COVERAGE = Gauge(
    "forecast_online_coverage",
    "Exponentially weighted interval coverage per sensor, model and horizon step.",
    ["sensor_id", "model", "horizon"],
    registry=REGISTRY,
)
DRIFT_EVENTS = Counter(
    "forecast_drift_events",
    "Drift events, by detector and signal.",
    ["detector", "signal"],
    registry=REGISTRY,
)
RETRAINS = Counter(
    "forecast_retrain_decisions",
    "Steps of the retraining loop, by action (triggered, trained, failed, promoted, kept).",
    ["action"],
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "forecast_consumer_lag",
    "Records behind the partition's end after the latest batch (highwater - next offset).",
    ["topic", "partition"],
    registry=REGISTRY,
)
WORKER_STALLED = Gauge(
    "forecast_worker_stalled",
    "1 while the worker makes no progress on its partitions (FORECAST_STALL_TIMEOUT).",
    registry=REGISTRY,
)
WORKER_IDLE_SECONDS = Gauge(
    "forecast_worker_seconds_since_progress",
    "Seconds since the worker last took in records or was caught up with its partitions.",
    registry=REGISTRY,
)
BROKER_DATA_LOST = Counter(
    "forecast_broker_data_lost",
    "Times a partition's end went below offsets the worker had read (it then exits).",
    registry=REGISTRY,
)
REREADS = Counter(
    "forecast_consumer_rereads",
    "Partitions read again from an offset the consumer skipped (see streams.ordering).",
    registry=REGISTRY,
)
EVENT_TO_PREDICTION = Histogram(
    "forecast_event_to_prediction_seconds",
    "From a record's Kafka timestamp to the publication of its batch's predictions.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
SINK_FLUSH_SECONDS = Histogram(
    "forecast_sink_flush_seconds",
    "Time to store one batch in ClickHouse (every table, retries included).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
SINK_ROWS = Counter("forecast_sink_rows", "Rows stored, by table.", ["table"], registry=REGISTRY)
SINK_ERRORS = Counter("forecast_sink_errors", "Failed store writes (retried).", registry=REGISTRY)
SINK_REJECTED = Counter(
    "forecast_sink_rejected",
    "Records on the store topic that were not a table of the engine (skipped, logged).",
    registry=REGISTRY,
)
WS_CONNECTIONS = Gauge("forecast_ws_connections", "Open websocket connections.", registry=REGISTRY)
AUDIT_RECORDS = Counter(
    "forecast_audit_records",
    "Audit records written, by action and result (ok, error).",
    ["action", "result"],
    registry=REGISTRY,
)
AUDIT_FAILURES = Counter(
    "forecast_audit_failures",
    "Audit records that could not be written (the act itself stood; see the log).",
    registry=REGISTRY,
)
WEBHOOK_DELIVERIES = Counter(
    "forecast_webhook_deliveries",
    "Webhook delivery attempts by result (delivered, failed, gave_up, refused).",
    ["result"],
    registry=REGISTRY,
)
WEBHOOK_SECONDS = Histogram(
    "forecast_webhook_seconds",
    "Time of one webhook delivery attempt, to the receiver's answer.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
WEBHOOK_PAUSES = Counter(
    "forecast_webhook_pauses",
    "Webhook endpoints paused after failing FORECAST_WEBHOOK_PAUSE_AFTER times in a row.",
    registry=REGISTRY,
)
WEBHOOK_PAUSED = Gauge(
    "forecast_webhook_endpoints_paused", "Webhook endpoints paused now.", registry=REGISTRY
)
WS_MESSAGES = Counter(
    "forecast_ws_messages", "Websocket messages sent, by type.", ["type"], registry=REGISTRY
)
WS_DROPPED = Counter(
    "forecast_ws_dropped",
    "Messages not delivered because a subscriber's queue overflowed.",
    registry=REGISTRY,
)


def render() -> bytes:
    return generate_latest(REGISTRY)


def observe_many(histogram_child, values) -> None:
    """``histogram_child.observe(v)`` for each of ``values``, at once (same exposition).

    Bucket counts come from ``np.searchsorted`` on the upper bounds (NaN falls in none, as
    with ``observe``); the sum is added left to right, as repeated ``observe`` would.
    Exemplars are not supported.
    """
    histogram_child._raise_if_not_observable()
    amounts = np.asarray(values, np.float64).ravel()
    if not amounts.size:
        return
    bounds = np.asarray(histogram_child._upper_bounds, np.float64)
    counts = np.bincount(np.searchsorted(bounds, amounts), minlength=len(bounds) + 1)
    for bucket, count in zip(histogram_child._buckets, counts.tolist(), strict=False):
        if count:
            bucket.inc(float(count))
    total = histogram_child._sum
    lock = getattr(total, "_lock", None)
    if lock is None or not hasattr(total, "_value"):  # e.g. multiprocess mode
        for amount in amounts.tolist():
            total.inc(amount)
        return
    with lock:  # one read-add-write, as atomic as the per-value inc
        total._value = float(np.add.accumulate(np.concatenate(([total._value], amounts)))[-1])


def gauge_values(gauge: Gauge) -> dict[tuple[str, ...], float]:
    """Every child of a labelled gauge, label values (in label order) to value, read
    without building a Sample per series (30,000 per-sensor series: 1 s through
    ``collect()``, under 0.1 s here). Falls back to ``collect()`` where the client keeps
    its children elsewhere (e.g. multiprocess mode)."""
    children = getattr(gauge, "_metrics", None)
    lock = getattr(gauge, "_lock", None)
    if children is None or lock is None:
        names = gauge._labelnames
        return {
            tuple(s.labels[n] for n in names): s.value
            for family in gauge.collect()
            for s in family.samples
        }
    with lock:
        items = list(children.items())
    out = {}
    for labels, child in items:
        value = getattr(child, "_value", None)
        out[labels] = float(value.get()) if value is not None else math.nan
    return out

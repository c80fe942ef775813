"""What a worker hands the sink: each batch's rows as Arrow tables, one per ClickHouse table.

A worker publishes each table as one Arrow IPC record on the ``store`` topic (header
``table``); the sink decodes it and inserts the columns as they are
(``insert_arrow``), so no value is converted one by one in Python on the way into
ClickHouse. The schemas below are the tables' own columns.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import orjson
import pyarrow as pa

from forecast.columns import PredictionBlock, ReadingBlock, epoch_ms
from forecast.schemas import DriftEvent, Prediction, Reading

MS = pa.timestamp("ms", tz="UTC")
FLOATS = pa.list_(pa.float64())
SCHEMAS = {
    "readings": pa.schema(
        [
            ("sensor_id", pa.string()),
            ("ts", MS),
            ("value", pa.float64()),
            ("covariates", pa.map_(pa.string(), pa.float64())),
            ("ingested_at", MS),
        ]
    ),
    "predictions": pa.schema(
        [
            ("sensor_id", pa.string()),
            ("ts", MS),
            ("issued_at", MS),
            ("model", pa.string()),
            ("model_version", pa.uint32()),
            ("stage", pa.string()),
            ("step_seconds", pa.float64()),
            ("yhat", FLOATS),
            ("lower", FLOATS),
            ("upper", FLOATS),
            ("seq", pa.uint64()),
        ]
    ),
    "drift_events": pa.schema(
        [
            ("sensor_id", pa.string()),
            ("ts", MS),
            ("detector", pa.string()),
            ("signal", pa.string()),
            ("model", pa.string()),
            ("model_version", pa.uint32()),
            ("detail", pa.string()),
        ]
    ),
}
TABLES = tuple(SCHEMAS)


def _ms(seconds: Sequence[float]) -> pa.Array:
    """Milliseconds as the messages write them (:func:`forecast.columns.epoch_ms`)."""
    return pa.array(epoch_ms(seconds), MS)


def readings_table(readings: Sequence[Reading], now: float | None = None) -> pa.Table:
    now = time.time() if now is None else now
    return pa.Table.from_arrays(
        [
            pa.array([r.sensor_id for r in readings], pa.string()),
            _ms([r.ts for r in readings]),
            pa.array([r.value for r in readings], pa.float64()),
            pa.array([list(r.covariates.items()) for r in readings], SCHEMAS["readings"][3].type),
            _ms([now] * len(readings)),
        ],
        schema=SCHEMAS["readings"],
    )


def predictions_table(predictions: Sequence[Prediction]) -> pa.Table:
    return pa.Table.from_arrays(
        [
            pa.array([p.sensor_id for p in predictions], pa.string()),
            _ms([p.ts for p in predictions]),
            _ms([p.issued_at for p in predictions]),
            pa.array([p.model for p in predictions], pa.string()),
            pa.array([p.model_version for p in predictions], pa.uint32()),
            pa.array([p.stage for p in predictions], pa.string()),
            pa.array([p.step_seconds for p in predictions], pa.float64()),
            pa.array([p.yhat for p in predictions], FLOATS),
            pa.array([p.lower for p in predictions], FLOATS),
            pa.array([p.upper for p in predictions], FLOATS),
            pa.array([p.seq for p in predictions], pa.uint64()),
        ],
        schema=SCHEMAS["predictions"],
    )


def readings_block_table(block: ReadingBlock, now: float | None = None) -> pa.Table:
    """:func:`readings_table` from columns."""
    now = time.time() if now is None else now
    n = len(block)
    return pa.Table.from_arrays(
        [
            pa.array(block.sensor_id, pa.string()),
            _ms(block.ts),
            pa.array(block.value, pa.float64()),
            _covariates(block.covariates, n),
            _ms(np.full(n, now)),
        ],
        schema=SCHEMAS["readings"],
    )


def _covariates(covariates: list[dict[str, float]] | None, n: int) -> pa.Array:
    """The covariates column; ``None``: n empty maps, built without a Python object each."""
    kind = SCHEMAS["readings"][3].type
    if covariates is not None:
        return pa.array([list(c.items()) for c in covariates], kind)
    offsets = pa.array(np.zeros(n + 1, np.int32))
    return pa.MapArray.from_arrays(offsets, pa.array([], pa.string()), pa.array([], pa.float64()))


def _lists(rows: np.ndarray) -> pa.Array:
    """A (n, k) float array as n lists of k floats, without a Python object per value."""
    n, k = rows.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), pa.float64()))


def predictions_block_table(blocks: Sequence[PredictionBlock]) -> pa.Table:
    """:func:`predictions_table` from columns (one or more blocks, any stages)."""
    tables = [
        pa.Table.from_arrays(
            [
                pa.array(b.sensor_id, pa.string()),
                _ms(b.ts),
                _ms(np.full(len(b), b.issued_at)),
                pa.array(b.model, pa.string()),
                pa.array(b.model_version, pa.uint32()),
                pa.array([b.stage] * len(b), pa.string()),
                pa.array(b.step_seconds, pa.float64()),
                _lists(np.ascontiguousarray(b.yhat, dtype=np.float64)),
                _lists(np.ascontiguousarray(b.lower, dtype=np.float64)),
                _lists(np.ascontiguousarray(b.upper, dtype=np.float64)),
                pa.array(b.seq, pa.uint64()),
            ],
            schema=SCHEMAS["predictions"],
        )
        for b in blocks
        if len(b)
    ]
    return pa.concat_tables(tables)


def block_tables(
    readings: ReadingBlock | None,
    predictions: Sequence[PredictionBlock],
    drift: Sequence[DriftEvent] = (),
    now: float | None = None,
) -> dict[str, pa.Table]:
    """:func:`batch_tables` from columns."""
    tables = {
        "readings": readings_block_table(readings, now) if readings else None,
        "predictions": (
            predictions_block_table(predictions) if any(len(b) for b in predictions) else None
        ),
        "drift_events": drift_table(drift) if drift else None,
    }
    return {name: table for name, table in tables.items() if table is not None}


def drift_table(events: Sequence[DriftEvent]) -> pa.Table:
    return pa.Table.from_arrays(
        [
            pa.array([e.sensor_id for e in events], pa.string()),
            _ms([e.ts for e in events]),
            pa.array([e.detector for e in events], pa.string()),
            pa.array([e.signal for e in events], pa.string()),
            pa.array([e.model for e in events], pa.string()),
            pa.array([e.model_version for e in events], pa.uint32()),
            pa.array([orjson.dumps(e.detail).decode() for e in events], pa.string()),
        ],
        schema=SCHEMAS["drift_events"],
    )


def batch_tables(
    readings: Sequence[Reading],
    predictions: Sequence[Prediction],
    drift: Sequence[DriftEvent] = (),
    now: float | None = None,
) -> dict[str, pa.Table]:
    """The non-empty tables of one processed batch."""
    tables = {
        "readings": readings_table(readings, now) if readings else None,
        "predictions": predictions_table(predictions) if predictions else None,
        "drift_events": drift_table(drift) if drift else None,
    }
    return {name: table for name, table in tables.items() if table is not None}


STORE_RECORD_BYTES = 512 * 1024
"""The most a ``store`` record should carry (brokers refuse records over about 1 MB)."""


def encode_chunks(table: pa.Table, max_bytes: int = STORE_RECORD_BYTES) -> list[bytes]:
    """``table`` as Arrow records of at most about ``max_bytes`` each (whole rows)."""
    if table.num_rows == 0:
        return []
    rows = max(1, int(table.num_rows * max_bytes / max(table.nbytes, 1)))
    return [encode(table.slice(start, rows)) for start in range(0, table.num_rows, rows)]


def encode(table: pa.Table) -> bytes:
    """One Arrow IPC stream (schema and record batches)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode(name: str, data: bytes) -> pa.Table:
    """A table from :func:`encode`; ValueError if it is not one of ``name``'s shape."""
    if name not in SCHEMAS:
        raise ValueError(f"unknown table {name!r}")
    try:
        table = pa.ipc.open_stream(data).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"not an Arrow stream: {exc}") from None
    if not table.schema.equals(SCHEMAS[name]):
        raise ValueError(f"{name}: schema {table.schema} is not {SCHEMAS[name]}")
    return table

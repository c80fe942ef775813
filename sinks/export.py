"""Exports of predictions or forecast errors for a sensor pattern and a time range.

ClickHouse writes the file itself (CSVWithNames, JSONEachRow or Parquet) and the engine
streams it on in chunks, so an export of any size costs no Python per row and no memory
for the whole file. An export runs as the caller's analyst session (read-only, its scope
applied as in :mod:`sinks.query`) and is refused before it starts if it would hold more
than its row cap.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from forecast.errors import QueryError
from sinks.clickhouse import Store
from sinks.query import Access, QueryLimits, glob_to_like, session_settings, stream_readonly
from sinks.schema import DATABASE

FORMATS = {"csv": "CSVWithNames", "json": "JSONEachRow", "parquet": "Parquet"}
MEDIA_TYPES = {
    "csv": "text/csv",
    "json": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}
SOURCES = {
    "predictions": (
        f"{DATABASE}.prediction_steps",
        "sensor_id, ts, target_ts, horizon, yhat, lower, upper, model, "
        "model_version, issued_at, seq",
    ),
    "errors": (
        f"{DATABASE}.forecast_errors",
        "sensor_id, ts, target_ts, horizon, model, model_version, yhat, lower, upper, "
        "actual, error, covered",
    ),
}


@dataclass(frozen=True)
class ExportRequest:
    what: str  # predictions | errors
    sensors: str  # glob pattern: * and ?
    start: datetime | None
    stop: datetime | None
    fmt: str  # csv | json | parquet

    def where(self) -> tuple[str, dict]:
        if self.what not in SOURCES:
            raise QueryError(f"unknown export {self.what!r}; one of {', '.join(SOURCES)}")
        if self.fmt not in FORMATS:
            raise QueryError(f"unknown format {self.fmt!r}; one of {', '.join(FORMATS)}")
        where = ["sensor_id LIKE {pattern:String}"]
        params: dict = {"pattern": glob_to_like(self.sensors)}
        if self.start is not None:
            where.append("ts >= {start:DateTime64(3, 'UTC')}")
            params["start"] = self.start
        if self.stop is not None:
            where.append("ts < {stop:DateTime64(3, 'UTC')}")
            params["stop"] = self.stop
        return " AND ".join(where), params

    def sql(self) -> tuple[str, dict]:
        where, params = self.where()
        source, columns = SOURCES[self.what]
        return (
            f"SELECT {columns} FROM {source} WHERE {where} ORDER BY sensor_id, ts, horizon",
            params,
        )


def export(
    store: Store,
    request: ExportRequest,
    access: Access | None = None,
    max_rows: int = 2_000_000,
    timeout: float = 300.0,
) -> Iterator[bytes]:
    """The export's bytes, chunk by chunk. Counting its rows first (raising QueryError
    with code ``export_too_large`` over ``max_rows``) happens before this returns."""
    access = access or Access()
    limits = QueryLimits(max_rows=max_rows, timeout=timeout, max_result_bytes=0)
    settings = session_settings(limits, access)
    where, params = request.where()
    source, _ = SOURCES[request.what]
    with store.analyst_session() as session:
        rows = session.query(f"SELECT count() FROM {source} WHERE {where}", params, settings)[0][0]
    if rows > max_rows:
        raise QueryError(
            f"the export holds {rows} rows, over the cap of {max_rows}; "
            "narrow the sensors or the time range",
            code="export_too_large",
        )
    sql, params = request.sql()
    return stream_readonly(store, sql, params, FORMATS[request.fmt], settings)

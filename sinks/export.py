"""Exports of predictions or forecast errors for a sensor pattern and a time range.

ClickHouse writes the file itself (CSVWithNames, JSONEachRow or Parquet), so an export of
any size costs no Python per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from forecast.errors import QueryError
from sinks.clickhouse import READ_SETTINGS, Store
from sinks.query import readonly_settings
from sinks.schema import DATABASE

FORMATS = {"csv": "CSVWithNames", "json": "JSONEachRow", "parquet": "Parquet"}
MEDIA_TYPES = {
    "csv": "text/csv",
    "json": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}
SOURCES = {
    "predictions": (
        f"{DATABASE}.predictions FINAL",
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

    def sql(self) -> tuple[str, dict]:
        if self.what not in SOURCES:
            raise QueryError(f"unknown export {self.what!r}; one of {', '.join(SOURCES)}")
        if self.fmt not in FORMATS:
            raise QueryError(f"unknown format {self.fmt!r}; one of {', '.join(FORMATS)}")
        source, columns = SOURCES[self.what]
        where = ["sensor_id LIKE {pattern:String}"]
        params: dict = {"pattern": glob_to_like(self.sensors)}
        if self.start is not None:
            where.append("ts >= {start:DateTime64(3, 'UTC')}")
            params["start"] = self.start
        if self.stop is not None:
            where.append("ts < {stop:DateTime64(3, 'UTC')}")
            params["stop"] = self.stop
        return (
            f"SELECT {columns} FROM {source} WHERE {' AND '.join(where)} "
            f"ORDER BY sensor_id, ts, horizon"
        ), params


def export(store: Store, request: ExportRequest, timeout: float = 300.0) -> bytes:
    sql, params = request.sql()
    settings = readonly_settings(**READ_SETTINGS, max_execution_time=timeout)
    with store.analyst_session() as session:
        return session.raw(sql, params, FORMATS[request.fmt], settings)


def glob_to_like(pattern: str) -> str:
    """``ETTh1.*`` to ``ETTh1.%`` (LIKE's own wildcards in the pattern are escaped)."""
    out = []
    for char in pattern:
        if char in "%_\\":
            out.append("\\" + char)
        elif char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        else:
            out.append(char)
    return "".join(out)

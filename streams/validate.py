"""Validation of raw `readings` records (pure: bytes in, readings and rejections out).

A record holds one reading (a JSON object) or a batch (a JSON array of them). Each
element is judged on its own, so one bad element is rejected alone. Reason codes:

===================  =============================================================
``oversize``         the record exceeds ``max_record_bytes`` or ``max_batch_readings``
``not_json``         not valid UTF-8 JSON
``wrong_type``       not an object, or a field of the wrong type
``missing_field``    ``sensor_id``, ``ts`` or ``value`` is absent
``bad_sensor_id``    empty, too long, or characters outside ``[A-Za-z0-9_.:-]``
``unknown_sensor``   the sensor matches none of ``FORECAST_SENSOR_ALLOW``
``non_finite``       the value or a covariate is NaN or infinite
``bad_time``         ``ts`` is neither RFC 3339 nor epoch seconds
``absurd_time``      ``ts`` before 1970-01-02 or more than ``max_future`` ahead
``bad_covariates``   ``covariates`` is not an object of numbers
``empty_batch``      an empty array
``late``             older than the sensor's latest reading by more than the lateness
===================  =============================================================
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import orjson

from forecast.parsing import Invalid, kind, parse_time
from forecast.schemas import Reading

SENSOR_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")
MIN_TS = 86_400.0
REQUIRED = ("sensor_id", "ts", "value")


@dataclass(slots=True, frozen=True)
class Rejection:
    """Why one record, or one element of a batch record, was refused."""

    reason: str
    detail: str
    index: int | None = None  # element index inside a batch record
    element: object = None  # the decoded element, for batch records


@dataclass(frozen=True, slots=True)
class Limits:
    max_record_bytes: int = 1_000_000
    max_batch_readings: int = 10_000
    max_future: float = 86_400.0
    sensor_patterns: Sequence[str] = ("*",)


def parse_record(
    raw: bytes | None, limits: Limits, now: float | None = None
) -> tuple[list[Reading], list[Rejection]]:
    """Decode one Kafka record value into valid readings and rejections."""
    if raw is None:
        return [], [Rejection("not_json", "empty record value")]
    if len(raw) > limits.max_record_bytes:
        return [], [Rejection("oversize", f"{len(raw)} bytes > {limits.max_record_bytes}")]
    try:
        doc = _loads(raw)
    except Invalid as exc:
        return [], [Rejection(exc.reason, exc.detail)]
    now = time.time() if now is None else now
    if not isinstance(doc, list):
        try:
            return [parse_reading(doc, limits, now)], []
        except Invalid as exc:
            return [], [Rejection(exc.reason, exc.detail)]
    if not doc:
        return [], [Rejection("empty_batch", "the batch array is empty")]
    if len(doc) > limits.max_batch_readings:
        detail = f"{len(doc)} readings > {limits.max_batch_readings}"
        return [], [Rejection("oversize", detail)]
    readings, rejections = [], []
    for index, element in enumerate(doc):
        try:
            readings.append(parse_reading(element, limits, now))
        except Invalid as exc:
            rejections.append(Rejection(exc.reason, exc.detail, index, element))
    return readings, rejections


def parse_reading(doc: object, limits: Limits, now: float) -> Reading:
    """Validate one decoded reading object; raise Invalid with a reason code."""
    if not isinstance(doc, dict):
        raise Invalid("wrong_type", f"a reading must be a JSON object, not {kind(doc)}")
    missing = [name for name in REQUIRED if name not in doc]
    if missing:
        raise Invalid("missing_field", "missing " + ", ".join(missing))
    sensor_id = doc["sensor_id"]
    if not isinstance(sensor_id, str):
        raise Invalid("wrong_type", f"sensor_id must be a string, not {kind(sensor_id)}")
    if not SENSOR_ID.match(sensor_id):
        raise Invalid(
            "bad_sensor_id", f"sensor_id {sensor_id[:60]!r} is not [A-Za-z0-9_.:-]{{1,200}}"
        )
    if not any(fnmatchcase(sensor_id, p) for p in limits.sensor_patterns):
        raise Invalid("unknown_sensor", f"sensor {sensor_id!r} is not allowed")
    value = _number(doc["value"], "value")
    ts = parse_time(doc["ts"])
    if ts < MIN_TS or ts > now + limits.max_future:
        raise Invalid("absurd_time", f"ts {doc['ts']!r} is outside 1970-01-02 .. now + max_future")
    return Reading(sensor_id, ts, value, _covariates(doc.get("covariates")))


def _number(raw: object, name: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise Invalid("wrong_type", f"{name} must be a number, not {kind(raw)}")
    value = float(raw)
    if not math.isfinite(value):
        raise Invalid("non_finite", f"{name} is {value}")
    return value


def _covariates(raw: object) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise Invalid("bad_covariates", f"covariates must be an object, not {kind(raw)}")
    out = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid("bad_covariates", f"covariate {name!r} is {kind(value)}, not a number")
        if not math.isfinite(value):
            raise Invalid("non_finite", f"covariate {name!r} is {value}")
        out[name] = float(value)
    return out


def _loads(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses NaN, Infinity and overflowing numbers; Python's parser accepts them,
    # so that such readings are reported as non-finite rather than as broken JSON.
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise Invalid("not_json", f"not JSON: {str(exc)[:120]}") from None

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
from itertools import compress, repeat
from operator import itemgetter

import numpy as np
import orjson

from forecast.parsing import Invalid, finite_float, kind, parse_time
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
    value = finite_float(raw)
    if value is None:
        raise Invalid("non_finite", f"{name} is {_shown(raw)}")
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
        number = finite_float(value)
        if number is None:
            raise Invalid("non_finite", f"covariate {name!r} is {_shown(value)}")
        out[name] = number
    return out


def _shown(number: int | float) -> str:
    """A number that is not finite as a float, for a rejection's detail."""
    return "too large for a float" if isinstance(number, int) else str(float(number))


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


# --- The batch parser: `parse_record` over many records, as columns -------------------------
#
# Each element is checked in bulk (types, sensor ids against a cache, finite values, time
# bounds); any element that fails a check goes through `parse_reading` alone, so reasons and
# details are the reference's by construction.

_NUMBERS = frozenset({float, int})
_MISSING = object()  # a field absent, or an element that is not an object
_SENSORS_MAX = 100_000  # validated sensor ids kept per pattern set; cleared when full
_TIMES_MAX = 10_000  # parsed RFC 3339 texts kept; cleared when full
_sensors: dict[tuple[str, ...], set[str]] = {}
_times: dict[str, float] = {}


@dataclass(slots=True)
class ParsedBatch:
    """The valid readings of many records as columns, and their rejections, in record order."""

    record: np.ndarray  # int64: the index of each reading's record in the input
    sensor_id: list[str]
    ts: np.ndarray  # float64 epoch seconds
    value: np.ndarray  # float64
    covariates: list[dict[str, float]] | None  # None when no reading has any
    rejections: list[tuple[int, Rejection]]  # (record index, rejection)

    def readings(self) -> list[Reading]:
        """The valid readings as `Reading` objects."""
        covariates = self.covariates or [{} for _ in self.sensor_id]
        return [
            Reading(*fields)
            for fields in zip(
                self.sensor_id, self.ts.tolist(), self.value.tolist(), covariates, strict=True
            )
        ]


@dataclass(slots=True)
class _Decoded:
    elements: list[object]  # every element of the records that decoded, in order
    record: list[int]  # the record index of each element
    starts: dict[int, int]  # batch record index -> position of its first element
    rejections: list[tuple[int, Rejection]]  # whole-record rejections


def parse_records(
    values: Sequence[bytes | None], limits: Limits, now: float | None = None
) -> ParsedBatch:
    """What `parse_record` gives for each value, in order, as columns (``now`` read once)."""
    now = time.time() if now is None else now
    decoded = _decode(values, limits)
    elements = decoded.elements
    sensor_ids, ts_raw, value_raw, covariates_raw = _fields(elements)
    ok = _sensor_mask(sensor_ids, limits)
    values_, finite = _floats(value_raw)
    ok &= finite
    ts, ts_ok = _times_column(ts_raw)
    ok &= ts_ok & (ts >= MIN_TS) & (ts <= now + limits.max_future)
    covariates = None
    if covariates_raw is not None:
        covariates = [_fast_covariates(raw) for raw in covariates_raw]
        ok &= np.fromiter((c is not None for c in covariates), bool, len(covariates))
    rejections = _fall_back(decoded, limits, now, ok, (sensor_ids, ts, values_, covariates))
    return _select(decoded, ok, sensor_ids, ts, values_, covariates, rejections)


def _decode(values: Sequence[bytes | None], limits: Limits) -> _Decoded:
    """Decode every record; judge what is judged per record (size, JSON, empty batches)."""
    out = _Decoded([], [], {}, [])
    elements, record, rejections = out.elements, out.record, out.rejections
    max_bytes, max_readings = limits.max_record_bytes, limits.max_batch_readings
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    for i, raw in enumerate(values):
        if raw is None:
            rejections.append((i, Rejection("not_json", "empty record value")))
            continue
        if len(raw) > max_bytes:
            rejections.append((i, Rejection("oversize", f"{len(raw)} bytes > {max_bytes}")))
            continue
        try:
            doc = loads(raw)
        except decode_error:
            try:
                doc = _loads(raw)
            except Invalid as exc:
                rejections.append((i, Rejection(exc.reason, exc.detail)))
                continue
        if not isinstance(doc, list):
            elements.append(doc)
            record.append(i)
        elif not doc:
            rejections.append((i, Rejection("empty_batch", "the batch array is empty")))
        elif len(doc) > max_readings:
            detail = f"{len(doc)} readings > {max_readings}"
            rejections.append((i, Rejection("oversize", detail)))
        else:
            out.starts[i] = len(elements)
            elements.extend(doc)
            record.extend(repeat(i, len(doc)))
    return out


def _fields(elements: list[object]) -> tuple[list, list, list, list | None]:
    """The sensor_id, ts, value and covariates columns (`_MISSING` where absent)."""
    try:
        sensor_ids = [e["sensor_id"] for e in elements]
        ts = [e["ts"] for e in elements]
        values = [e["value"] for e in elements]
        covariates = [e.get("covariates") for e in elements]
    except (KeyError, TypeError, AttributeError):
        dicts = [e if type(e) is dict else {} for e in elements]
        sensor_ids = [d.get("sensor_id", _MISSING) for d in dicts]
        ts = [d.get("ts", _MISSING) for d in dicts]
        values = [d.get("value", _MISSING) for d in dicts]
        covariates = [d.get("covariates") for d in dicts]
    if covariates.count(None) == len(covariates):
        return sensor_ids, ts, values, None
    return sensor_ids, ts, values, covariates


def _sensor_mask(sensor_ids: list, limits: Limits) -> np.ndarray:
    """Which sensor ids are well-formed and allowed (each distinct id is checked once)."""
    patterns = tuple(limits.sensor_patterns)
    known = _sensors.get(patterns)
    if known is None:
        if len(_sensors) >= 16:
            _sensors.clear()
        known = _sensors[patterns] = set()
    try:
        if known.issuperset(sensor_ids):
            return np.ones(len(sensor_ids), bool)
    except TypeError:  # an unhashable sensor_id: a list or an object
        pass
    return np.fromiter((_sensor_ok(s, known, patterns) for s in sensor_ids), bool, len(sensor_ids))


def _sensor_ok(sensor_id: object, known: set[str], patterns: tuple[str, ...]) -> bool:
    if type(sensor_id) is not str:
        return False
    if sensor_id in known:
        return True
    if not SENSOR_ID.match(sensor_id) or not any(fnmatchcase(sensor_id, p) for p in patterns):
        return False
    if len(known) >= _SENSORS_MAX:
        known.clear()
    known.add(sensor_id)
    return True


def _floats(column: list) -> tuple[np.ndarray, np.ndarray]:
    """A float64 column and which entries are finite numbers (bools and text are not)."""
    if set(map(type, column)) <= _NUMBERS:
        try:
            out = np.array(column, dtype=np.float64)
        except OverflowError:  # an integer beyond float range
            pass
        else:
            return out, np.isfinite(out)
    out = np.fromiter(map(_float_or_nan, column), np.float64, len(column))
    return out, np.isfinite(out)


def _float_or_nan(raw: object) -> float:
    if type(raw) not in _NUMBERS:
        return math.nan
    try:
        return float(raw)
    except OverflowError:
        return math.nan


def _times_column(column: list) -> tuple[np.ndarray, np.ndarray]:
    """Epoch seconds for numeric or RFC 3339 ``ts`` entries; NaN (not ok) for the rest."""
    if set(map(type, column)) <= _NUMBERS:
        return _floats(column)
    out = np.fromiter(map(_time_or_nan, column), np.float64, len(column))
    return out, np.isfinite(out)


def _time_or_nan(raw: object) -> float:
    if type(raw) is not str:
        return _float_or_nan(raw)
    ts = _times.get(raw)
    if ts is None:
        try:
            ts = parse_time(raw)
        except Exception:  # any failure: `parse_reading` reports it
            ts = math.nan
        if len(raw) <= 64:  # longer texts are refused anyway; keep the cache small
            if len(_times) >= _TIMES_MAX:
                _times.clear()
            _times[raw] = ts
    return ts


def _fast_covariates(raw: object) -> dict[str, float] | None:
    """The covariates as floats, or None when they need `parse_reading` to judge them."""
    if raw is None:
        return {}
    if type(raw) is not dict or not set(map(type, raw.values())) <= _NUMBERS:
        return None
    try:
        out = {name: float(value) for name, value in raw.items()}
    except OverflowError:
        return None
    return out if all(map(math.isfinite, out.values())) else None


def _fall_back(
    decoded: _Decoded,
    limits: Limits,
    now: float,
    ok: np.ndarray,
    columns: tuple[list, np.ndarray, np.ndarray, list | None],
) -> list[tuple[int, Rejection]]:
    """Judge each element that failed a bulk check with `parse_reading`, in order."""
    sensor_ids, ts, values, covariates = columns
    elements, record, starts = decoded.elements, decoded.record, decoded.starts
    rejections: list[tuple[int, Rejection]] = []
    for p in np.flatnonzero(~ok).tolist():
        element, i = elements[p], record[p]
        try:
            reading = parse_reading(element, limits, now)
        except Invalid as exc:
            start = starts.get(i)
            if start is None:
                rejections.append((i, Rejection(exc.reason, exc.detail)))
            else:
                rejections.append((i, Rejection(exc.reason, exc.detail, p - start, element)))
            continue
        ok[p] = True  # stricter bulk checks than the reference's: keep its reading
        sensor_ids[p], ts[p], values[p] = reading.sensor_id, reading.ts, reading.value
        if covariates is not None:  # None: no element has covariates
            covariates[p] = reading.covariates
    if not decoded.rejections:
        return rejections
    if not rejections:
        return decoded.rejections
    return sorted(decoded.rejections + rejections, key=itemgetter(0))


def _select(
    decoded: _Decoded,
    ok: np.ndarray,
    sensor_ids: list,
    ts: np.ndarray,
    values: np.ndarray,
    covariates: list | None,
    rejections: list[tuple[int, Rejection]],
) -> ParsedBatch:
    """Keep the columns' valid entries."""
    record = np.array(decoded.record, dtype=np.int64)
    if not ok.all():
        keep = ok.tolist()
        record, ts, values = record[ok], ts[ok], values[ok]
        sensor_ids = list(compress(sensor_ids, keep))
        if covariates is not None:
            covariates = list(compress(covariates, keep))
    if covariates is not None and not any(covariates):
        covariates = None
    return ParsedBatch(record, sensor_ids, ts, values, covariates, rejections)

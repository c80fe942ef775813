"""Validation of raw readings: hand-picked and property-based bad input."""

from __future__ import annotations

import json
import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.validate import Limits, parse_record, parse_time

NOW = 1_800_000_000.0
LIMITS = Limits(
    max_record_bytes=4096, max_batch_readings=50, max_future=86_400.0, sensor_patterns=("*",)
)
GOOD = {"sensor_id": "ETTh1.OT", "ts": "2016-07-01T00:00:00Z", "value": 30.5}


def reasons(raw: bytes, limits: Limits = LIMITS) -> list[str]:
    return [r.reason for r in parse_record(raw, limits, NOW)[1]]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not_json"),
        (b"{not json", "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"42", "wrong_type"),
        (b'"text"', "wrong_type"),
        (b"[]", "empty_batch"),
        (b'{"ts": 1, "value": 1}', "missing_field"),
        (b'{"sensor_id": "a", "value": 1}', "missing_field"),
        (b'{"sensor_id": "a", "ts": 1e9}', "missing_field"),
        (b'{"sensor_id": 7, "ts": 1e9, "value": 1}', "wrong_type"),
        (b'{"sensor_id": "", "ts": 1e9, "value": 1}', "bad_sensor_id"),
        (b'{"sensor_id": "a b", "ts": 1e9, "value": 1}', "bad_sensor_id"),
        (b'{"sensor_id": "a", "ts": 1e9, "value": "1"}', "wrong_type"),
        (b'{"sensor_id": "a", "ts": 1e9, "value": true}', "wrong_type"),
        (b'{"sensor_id": "a", "ts": 1e9, "value": null}', "wrong_type"),
        (b'{"sensor_id": "a", "ts": 1e9, "value": NaN}', "non_finite"),
        (b'{"sensor_id": "a", "ts": 1e9, "value": Infinity}', "non_finite"),
        (b'{"sensor_id": "a", "ts": 1e9, "value": -1e400}', "non_finite"),
        (b'{"sensor_id": "a", "ts": "yesterday", "value": 1}', "bad_time"),
        (b'{"sensor_id": "a", "ts": "2016-13-01T00:00:00Z", "value": 1}', "bad_time"),
        (b'{"sensor_id": "a", "ts": [1], "value": 1}', "bad_time"),
        (b'{"sensor_id": "a", "ts": 0, "value": 1}', "absurd_time"),
        (b'{"sensor_id": "a", "ts": 1.8e12, "value": 1}', "absurd_time"),
        (b'{"sensor_id": "a", "ts": "9999-01-01T00:00:00Z", "value": 1}', "absurd_time"),
        (b'{"sensor_id": "a", "ts": 1e9, "value": 1, "covariates": [1]}', "bad_covariates"),
        (b'{"sensor_id": "a", "ts": 1e9, "value": 1, "covariates": {"x": "1"}}', "bad_covariates"),
        (b'{"sensor_id": "a", "ts": 1e9, "value": 1, "covariates": {"x": NaN}}', "non_finite"),
        (b"[" + b",".join([orjson.dumps(GOOD)] * 51) + b"]", "oversize"),
        (b'{"sensor_id": "a", "ts": 1e9, "value": 1, "pad": "' + b"x" * 5000 + b'"}', "oversize"),
    ],
)
def test_hand_picked_bad_readings(raw: bytes, reason: str) -> None:
    assert reasons(raw) == [reason]


def test_unknown_sensor_policy() -> None:
    limits = Limits(sensor_patterns=("ETTh1.*",))
    assert reasons(b'{"sensor_id": "other.x", "ts": 1e9, "value": 1}', limits) == ["unknown_sensor"]
    assert reasons(orjson.dumps(GOOD), limits) == []


def test_good_reading_forms() -> None:
    readings, rejected = parse_record(
        orjson.dumps({**GOOD, "covariates": {"HUFL": 5}}), LIMITS, NOW
    )
    assert rejected == []
    assert readings[0].ts == 1467331200.0
    assert readings[0].covariates == {"HUFL": 5.0}
    assert parse_time("2016-07-01T02:00:00+02:00") == 1467331200.0
    assert parse_time("2016-07-01 00:00:00") == 1467331200.0
    assert parse_time(1467331200) == 1467331200.0


def test_batch_elements_are_judged_alone() -> None:
    batch = [GOOD, {"sensor_id": "x"}, {**GOOD, "value": "high"}, {**GOOD, "sensor_id": "b"}]
    readings, rejected = parse_record(orjson.dumps(batch), LIMITS, NOW)
    assert [r.sensor_id for r in readings] == ["ETTh1.OT", "b"]
    assert [(r.index, r.reason) for r in rejected] == [(1, "missing_field"), (2, "wrong_type")]
    assert rejected[0].element == {"sensor_id": "x"}


@given(st.binary(max_size=300))
def test_any_bytes_are_accepted_or_rejected_never_raised(raw: bytes) -> None:
    readings, rejected = parse_record(raw, LIMITS, NOW)
    assert len(readings) + len(rejected) >= 1
    assert all(math.isfinite(r.value) for r in readings)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
json_values = (
    json_scalars
    | st.sampled_from(["2016-07-01T00:00:00Z", "ETTh1.OT", "a b"])
    | st.lists(json_scalars, max_size=2)
    | st.dictionaries(st.text(max_size=3), json_scalars, max_size=2)
)


@given(
    st.dictionaries(
        st.sampled_from(["sensor_id", "ts", "value", "covariates", "x"]), json_values, max_size=5
    )
)
def test_arbitrary_objects_never_pass_unless_valid(doc: dict) -> None:
    raw = json.dumps(doc).encode()  # Python's json writes NaN and Infinity too
    readings, rejected = parse_record(raw, LIMITS, NOW)
    if readings:
        (reading,) = readings
        assert isinstance(doc["sensor_id"], str) and reading.sensor_id == doc["sensor_id"]
        assert isinstance(doc["value"], int | float) and not isinstance(doc["value"], bool)
        assert math.isfinite(reading.value)
    else:
        assert rejected[0].reason in {
            "missing_field",
            "wrong_type",
            "bad_sensor_id",
            "non_finite",
            "bad_time",
            "absurd_time",
            "bad_covariates",
        }


@given(st.sampled_from([math.nan, math.inf, -math.inf]), st.sampled_from(["value", "covariate"]))
def test_non_finite_values_are_named(value: float, where: str) -> None:
    doc = {**GOOD, "value": value} if where == "value" else {**GOOD, "covariates": {"x": value}}
    assert reasons(json.dumps(doc).encode()) == ["non_finite"]

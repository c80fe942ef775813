"""The batch parser `parse_records` gives what the reference `parse_record` gives, as columns."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tests.test_validate as reference_tests  # not `from`: pytest would collect its tests again
from streams.validate import Limits, ParsedBatch, Rejection, parse_record, parse_records

NOW = 1_800_000_000.0
LIMITS = Limits(
    max_record_bytes=4096,
    max_batch_readings=50,
    max_future=86_400.0,
    sensor_patterns=("ETTh1.*", "s*", "ok*"),
)
GOOD = {"sensor_id": "ETTh1.OT", "ts": "2016-07-01T00:00:00Z", "value": 30.5}


def same_rejection(rejection: Rejection) -> tuple:
    """A rejection as comparable values (`repr` so that NaN in an element equals itself)."""
    return rejection.reason, rejection.detail, rejection.index, repr(rejection.element)


def assert_equivalent(values: list[bytes | None], limits: Limits = LIMITS) -> ParsedBatch:
    """parse_records(values) holds, record by record, what parse_record gives for each."""
    batch = parse_records(values, limits, NOW)
    assert batch.record.dtype == np.int64 and batch.ts.dtype == batch.value.dtype == np.float64
    n = len(batch.sensor_id)
    assert len(batch.record) == len(batch.ts) == len(batch.value) == n
    assert batch.covariates is None or len(batch.covariates) == n
    assert list(batch.record) == sorted(batch.record)
    assert [i for i, _ in batch.rejections] == sorted(i for i, _ in batch.rejections)
    readings = batch.readings()
    for i, raw in enumerate(values):
        expected, rejected = parse_record(raw, limits, NOW)
        got = [r for r, index in zip(readings, batch.record.tolist(), strict=True) if index == i]
        assert [repr(r) for r in got] == [repr(r) for r in expected]  # repr: floats bit for bit
        assert [same_rejection(r) for j, r in batch.rejections if j == i] == [
            same_rejection(r) for r in rejected
        ]
    if batch.covariates is None:
        assert all(not r.covariates for r in readings)
    return batch


def encode(doc: object) -> bytes:
    return json.dumps(doc).encode()  # Python's json writes NaN and Infinity as well


def encode_fast(doc: object) -> bytes:
    try:
        return orjson.dumps(doc)
    except TypeError:  # an integer beyond 64 bits
        return encode(doc)


def rfc3339(moment: datetime, zulu: bool) -> str:
    text = moment.isoformat()
    return text.replace("+00:00", "Z" if zulu else "+00:00")


good_ids = st.sampled_from(["ETTh1.OT", "ETTh1.HUFL", "s17", "s-1:a_b.c", "ok\n"])
bad_ids = st.sampled_from(["other.x", "", "a b", "s" * 201, "s/", "é", 7, None, True, ["s"], {}])
good_times = st.one_of(
    st.floats(min_value=86_400.0, max_value=NOW + 86_400.0),
    st.integers(min_value=86_400, max_value=int(NOW)),
    st.builds(
        rfc3339,
        st.datetimes(
            min_value=datetime(1970, 1, 3),
            max_value=datetime(2030, 1, 1),
            timezones=st.sampled_from([None, UTC, timezone(timedelta(hours=2))]),
        ),
        st.booleans(),
    ),
)
odd_times = st.datetimes(min_value=datetime(1969, 12, 30), max_value=datetime(1970, 1, 3)).map(
    datetime.isoformat
) | st.sampled_from(
    [
        *(0, 86_399.999, 86_400, NOW + 86_400.0, NOW + 86_400.001, 1.8e12, -1.0),
        *(math.nan, math.inf, -math.inf, True, None, [1], {"t": 1}, "yesterday", "", " "),
        *(" 2016-07-01T00:00:00Z ", "2016-07-01T00:00:00z", "2016-07-01 00:00:00"),
        *("2016-07-01T02:00:00+02:00", "2016-13-01T00:00:00Z", "9999-01-01T00:00:00Z"),
        *("1970-01-01T00:00:00Z", "2" * 41),
    ]
)
finite = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**70), 2**70)
odd_values = st.floats() | st.sampled_from(
    [math.nan, math.inf, -math.inf, True, False, None, "1", [1], {}, -0.0]
)
good_covariates = st.none() | st.dictionaries(st.text(max_size=3), finite, max_size=3)
odd_covariates = st.sampled_from([[1], "x", 1, {}]) | st.dictionaries(
    st.text(max_size=3), finite | odd_values, min_size=1, max_size=3
)
good = st.fixed_dictionaries(
    {"sensor_id": good_ids, "ts": good_times, "value": finite},
    optional={"covariates": good_covariates, "extra": st.integers()},
)
mixed = st.fixed_dictionaries(
    {
        "sensor_id": good_ids | good_ids | bad_ids,
        "ts": good_times | odd_times | odd_times,
        "value": finite | odd_values,
    },
    optional={"covariates": good_covariates | odd_covariates},
)
flaws = st.one_of(
    st.tuples(st.just("sensor_id"), bad_ids),
    st.tuples(st.just("ts"), odd_times),
    st.tuples(st.just("value"), odd_values),
    st.tuples(st.just("covariates"), odd_covariates),
)
flawed = st.builds(lambda doc, flaw: {**doc, flaw[0]: flaw[1]}, good, flaws)  # one bad field
partial = st.fixed_dictionaries(
    {},
    optional={
        "sensor_id": good_ids,
        "ts": good_times,
        "value": finite,
        "covariates": good_covariates,
    },
)
elements = st.one_of(
    good,
    good,
    flawed,
    flawed,
    mixed,
    partial,
    st.sampled_from([None, True, 0, 1.5, "x", "", [], [1, 2], [{}]]),  # not objects
)
records = st.one_of(
    elements.map(encode),
    elements.map(encode),
    st.lists(elements, max_size=8).map(encode),
    st.lists(elements, max_size=8).map(encode),
    st.lists(good, max_size=8).map(encode_fast),
    st.integers(min_value=51, max_value=60).map(lambda n: orjson.dumps([GOOD] * n)),
    st.just(b'{"sensor_id": "s1", "ts": 1e9, "value": 1, "pad": "' + b"x" * 5000 + b'"}'),
    st.sampled_from([b"", b"{not json", b"\xff\xfe", b"42", b'"text"', b"[]", b"[[]]", b"null"]),
    st.binary(max_size=30),
    st.none(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, max_size=12))
def test_generated_records_match_the_reference(values: list[bytes | None]) -> None:
    assert_equivalent(values)


def hand_picked() -> list[bytes]:
    (mark,) = (m for m in reference_tests.test_hand_picked_bad_readings.pytestmark)
    return [raw for raw, _ in mark.args[1]]


def test_the_reference_tests_records_match() -> None:
    good = [
        orjson.dumps(GOOD),
        orjson.dumps({**GOOD, "covariates": {"HUFL": 5}}),
        orjson.dumps(
            [GOOD, {"sensor_id": "x"}, {**GOOD, "value": "high"}, {**GOOD, "sensor_id": "b"}]
        ),
    ]
    picked = hand_picked()
    assert len(picked) > 20
    assert_equivalent(picked + good)
    assert_equivalent(good + picked, reference_tests.LIMITS)
    for raw in picked:
        assert_equivalent([raw], reference_tests.LIMITS)
    non_finite = [
        encode({**GOOD, "value": math.nan}),
        encode({**GOOD, "covariates": {"x": -math.inf}}),
    ]
    assert_equivalent(non_finite)


def test_a_batch_record_becomes_columns() -> None:
    batch = [{"sensor_id": f"s{j}", "ts": 1_700_000_000.0 + j, "value": j / 2} for j in range(100)]
    batch[7] = {"sensor_id": "s7", "ts": "2023-11-14T22:13:20Z", "value": 3, "covariates": {"x": 1}}
    raws = [None, orjson.dumps(batch), orjson.dumps(batch[:3])]
    parsed = assert_equivalent(raws, Limits(max_record_bytes=10_000, max_batch_readings=100))
    assert parsed.record.tolist() == [1] * 100 + [2] * 3
    assert parsed.sensor_id == [f"s{j}" for j in range(100)] + ["s0", "s1", "s2"]
    assert parsed.ts[7] == 1_700_000_000.0 and parsed.ts[99] == 1_700_000_099.0
    assert parsed.value.tolist()[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0]
    assert parsed.covariates is not None and parsed.covariates[7] == {"x": 1.0}
    assert parsed.covariates[6] == {}
    assert parsed.rejections == [(0, Rejection("not_json", "empty record value"))]


def test_long_time_texts_are_refused_and_not_cached() -> None:
    raws = [encode({**GOOD, "ts": " " * n + "2016-07-01T00:00:00Z"}) for n in (10, 50, 1000)]
    assert_equivalent(raws + raws)


def test_no_covariates_and_no_records() -> None:
    parsed = assert_equivalent([orjson.dumps({**GOOD, "covariates": None}), orjson.dumps(GOOD)])
    assert parsed.covariates is None
    empty = parse_records([], LIMITS)
    assert len(empty.record) == 0 and empty.sensor_id == [] and empty.rejections == []


def test_the_sensor_cache_is_per_pattern_set() -> None:
    raw = orjson.dumps({"sensor_id": "other.x", "ts": 1e9, "value": 1})
    assert len(parse_records([raw], Limits(), NOW).sensor_id) == 1
    assert_equivalent([raw], Limits(sensor_patterns=("ETTh1.*",)))
    assert_equivalent([raw], Limits(sensor_patterns=["other.*"]))


def test_integers_round_as_the_reference_rounds() -> None:
    big = [2**53 + 1, 2**63 - 1, 2**63 + 1, 2**64 - 1, 2**64 + 1, -(2**63) - 1, 2**70 + 1]
    ints = [{"sensor_id": "s1", "ts": 10**9 + i, "value": n} for i, n in enumerate(big)]
    mixed = [{**doc, "value": 0.5} if i % 2 else doc for i, doc in enumerate(ints)]
    covariates = [{**doc, "covariates": {"x": n}} for doc, n in zip(ints, big, strict=True)]
    records = [encode(doc) for doc in ints] + [encode(ints), encode(mixed), encode(covariates)]
    assert len(assert_equivalent(records).sensor_id) == 4 * len(big)


def test_integers_beyond_floats_are_rejected_not_raised() -> None:
    """An integer too large for a float is refused as not finite (it used to raise,
    which stopped the worker on that record after every restart)."""
    huge = "1" + "0" * 400
    good = '{"sensor_id": "s1", "ts": 1e9, "value": 1}'
    for bad, reason in (
        (f'{{"sensor_id": "s1", "ts": 1e9, "value": {huge}}}', "non_finite"),
        (f'{{"sensor_id": "s1", "ts": {huge}, "value": 1}}', "bad_time"),
        (
            f'{{"sensor_id": "s1", "ts": 1e9, "value": 1, "covariates": {{"x": {huge}}}}}',
            "non_finite",
        ),
    ):
        raw = f"[{good}, {bad}]".encode()
        readings, rejections = parse_record(raw, LIMITS, NOW)
        assert len(readings) == 1 and [r.reason for r in rejections] == [reason]
        assert_equivalent([orjson.dumps(GOOD), raw])

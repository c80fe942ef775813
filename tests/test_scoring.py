"""The columnar scoring (streams.scoring) against the reference ResidualTracker."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from forecast.metrics import observe_many
from forecast.schemas import Prediction
from streams.residuals import ResidualTracker
from streams.scoring import ScoreColumns

HORIZONS = (1, 6, 24)
# name, version, horizon H, stage (the shadow model is promoted halfway)
MODELS = [("ar", 3, 24, "production"), ("tft", 1, 12, "shadow"), ("naive", 1, 6, "production")]
# step seconds of the forecasts, and the mean spacing of readings in steps
SENSORS = [(3600.0, 1.0), (600.0, 1.0), (60.0, 1.0), (3600.0, 0.35), (900.0, 2.5), (300.0, 1.0)]


def plain_doc(cols: ScoreColumns, slot: int) -> dict:
    """A slot's snapshot with its arrays as lists (as JSON gives it back)."""
    return orjson.loads(orjson.dumps(cols.to_doc(slot), option=orjson.OPT_SERIALIZE_NUMPY))


class Reference:
    """The worker's use of ResidualTracker: one book per sensor."""

    def __init__(self, sensors: list[str]):
        self.tracker = ResidualTracker(HORIZONS)
        self.books: dict[str, dict] = {s: {} for s in sensors}

    def observe(self, sensor: str, ts: float, value: float) -> list:
        return self.tracker.observe(self.books[sensor], sensor, ts, value)

    def expect(self, prediction: Prediction) -> None:
        self.tracker.expect(self.books[prediction.sensor_id], prediction)

    def online(self, sensor: str, key: str) -> tuple[list[float], list[float], list[int]]:
        entry = self.books[sensor].get(key, {"mae": {}, "coverage": {}, "n": {}})
        stats = [[entry[s].get(str(h), math.nan) for h in HORIZONS] for s in ("mae", "coverage")]
        return stats[0], stats[1], [entry["n"].get(str(h), 0) for h in HORIZONS]

    def longest_fifo(self) -> int:
        fifos = [w for b in self.books.values() for e in b.values() for w in e["pending"].values()]
        return max((len(w) for w in fifos), default=0)


def _spacing(rng: np.random.Generator, step: float, mean: float) -> float:
    """Regular, jittered, with gaps, now and then off every target."""
    kind = rng.random()
    if kind < 0.08:
        return step * rng.integers(3, 30)  # a gap
    if kind < 0.15:
        return step * (mean + rng.choice([0.6, 0.7, -0.6]) * mean)  # misses the targets
    if kind < 0.5:
        return step * mean * (1 + rng.uniform(-0.45, 0.45))  # jitter
    return step * mean


def _forecast(rng: np.random.Generator, n: int, horizon: int) -> tuple[np.ndarray, ...]:
    yhat = np.round(rng.normal(0, 2, (n, horizon)), 1)  # rounded: actuals hit the bounds
    width = np.round(rng.uniform(0, 2, (n, horizon)), 1)
    return yhat, yhat - width, yhat + width


def _assert_online(ref: Reference, cols: dict, sensors: list[str], slots: np.ndarray) -> None:
    for name, version, _, _ in MODELS:
        key = f"{name}@{version}"
        want = zip(*(ref.online(sensor, key) for sensor in sensors), strict=True)
        for got, expected in zip(cols[key].online(slots), want, strict=True):
            np.testing.assert_array_equal(got, np.array(expected))


def _run(seed: int, batches: int = 160) -> int:
    """Both implementations over one random stream; returns the residuals compared."""
    rng = np.random.default_rng(seed)
    sensors = [f"s{i}" for i in range(len(SENSORS))]
    slots = rng.permutation(16)[: len(sensors)].astype(np.int64)
    ref = Reference(sensors)
    cols = {f"{m}@{v}": ScoreColumns(HORIZONS, capacity=16) for m, v, _, _ in MODELS}
    clock = rng.uniform(0, 3600, len(sensors)) + 1.7e9
    compared = 0
    for batch in range(batches):
        chosen = np.flatnonzero(rng.random(len(sensors)) < 0.8)
        for i in chosen:
            clock[i] += _spacing(rng, *SENSORS[i])
        ts = clock[chosen].copy()
        values = np.round(rng.normal(0, 2, len(chosen)), 1)
        ids = [sensors[i] for i in chosen]
        # Observe the readings, then expect the forecasts made after them.
        readings = zip(ids, ts.tolist(), values.tolist(), strict=True)
        want = [ref.observe(s, t, v) for s, t, v in readings]
        for name, version, _, _ in MODELS:
            got = cols[f"{name}@{version}"].observe(slots[chosen], ts, values)
            mine = got.residuals(ids, name, version)
            theirs = [r for rs in want for r in rs if (r.model, r.model_version) == (name, version)]
            assert mine == theirs
            compared += len(mine)
        _assert_online(ref, cols, sensors, slots)
        for name, version, horizon, stage in MODELS:
            stage = "production" if name == "tft" and batch > batches // 2 else stage
            issued = chosen[rng.random(len(chosen)) < 0.9]  # a model may skip a sensor
            step = np.array([SENSORS[i][0] for i in issued])
            yhat, lower, upper = _forecast(rng, len(issued), horizon)
            cols[f"{name}@{version}"].expect(
                slots[issued], clock[issued], step, yhat, lower, upper, stage
            )
            for k, i in enumerate(issued):
                ref.expect(
                    Prediction(
                        sensors[i], float(clock[i]), 0.0, name, version, float(step[k]),
                        yhat[k].tolist(), lower[k].tolist(), upper[k].tolist(), 0, stage,
                    )
                )  # fmt: skip
        assert ref.longest_fifo() <= cols["ar@3"].max_pending  # no overflow in this stream
    _assert_online(ref, cols, sensors, slots)
    return compared


@pytest.mark.parametrize("seed", range(6))
def test_same_residuals_and_statistics_as_the_reference(seed):
    assert _run(seed) > 500


def test_several_steps_of_one_fifo_learn_in_order():
    tracker, book = ResidualTracker((1,)), {}
    cols = ScoreColumns((1,), capacity=2)
    for t, y in [(0.0, 1.0), (1.0, 2.0), (2.0, 4.0), (3.0, 8.0)]:  # targets 10..13
        tracker.expect(book, Prediction("a", t, 0.0, "m", 1, 10.0, [y], [y], [y], 0))
        one = np.array([[y]])
        cols.expect(np.array([1]), np.array([t]), np.array([10.0]), one, one, one, "production")
    want = tracker.observe(book, "a", 12.0, 3.0)
    got = cols.observe(np.array([1]), np.array([12.0]), np.array([3.0]))
    assert len(got) == 4 and got.residuals(["a"], "m", 1) == want
    mae, coverage, n = cols.online(np.array([1]))
    assert (mae[0, 0], coverage[0, 0], n[0, 0]) == (book["m@1"]["mae"]["1"], 0.0, 4)


def test_a_full_fifo_drops_its_oldest_step():
    cols = ScoreColumns((1,), capacity=1, max_pending=3)
    for t in range(5):  # far targets: nothing is due in between
        cols.expect(np.array([0]), np.array([float(t)]), np.array([1000.0]),
                    *[np.array([[float(t)]])] * 3, "production")  # fmt: skip
    pending = plain_doc(cols, 0)["pending"]["1"]
    assert [step[1] for step in pending] == [2.0, 3.0, 4.0]
    got = cols.observe(np.array([0]), np.array([1003.0]), np.array([0.0]))
    assert got.yhat.tolist() == [2.0, 3.0, 4.0]
    assert got.index.tolist() == [0, 0, 0]


def test_order_of_rows_reading_then_horizon_then_fifo():
    cols = ScoreColumns((1, 2), capacity=4)
    for t in (0.0, 0.125):
        cols.expect(np.array([3, 1]), np.array([t, t]), np.array([1.0, 1.0]),
                    *[np.ones((2, 2))] * 3, "shadow")  # fmt: skip
    got = cols.observe(np.array([1, 3]), np.array([1.625, 1.625]), np.array([1.0, 1.0]))
    # h=1: target 1.0 passed (popped, no residual), 1.125 hit; h=2: 2.0 and 2.125 hit
    assert got.index.tolist() == [0, 0, 0, 1, 1, 1]
    assert got.horizon.tolist() == [1, 2, 2, 1, 2, 2]
    assert got.target_ts.tolist() == [1.125, 2.0, 2.125] * 2
    assert got.stages() == ["shadow"] * 6
    assert got.covered.all() and not got.error.any()
    assert not cols.observe(np.array([1]), np.array([9.0]), np.array([0.0])).index.size


def test_snapshot_round_trip_through_orjson():
    cols = ScoreColumns(HORIZONS, capacity=4, max_pending=8)
    rng = np.random.default_rng(7)
    for t in range(30):
        cols.observe(np.array([1, 2]), np.array([t * 10.0] * 2), rng.normal(size=2))
        yhat = rng.normal(size=(2, 24))
        cols.expect(np.array([1, 2]), np.array([t * 10.0] * 2), np.array([10.0, 10.0]),
                    yhat, yhat - 1, yhat + 1, "shadow")  # fmt: skip
    docs = [orjson.loads(orjson.dumps(plain_doc(cols, s), option=orjson.OPT_SERIALIZE_NUMPY))
            for s in range(4)]  # fmt: skip
    assert docs[1]["pending"]["24"] and docs[1]["n"]["1"] == 29 and docs[0]["pending"] == {}
    back = ScoreColumns(HORIZONS, capacity=4, max_pending=8)
    for s in (3, 2, 1, 0):
        back.from_doc(s, docs[s])
    assert [plain_doc(back, s) for s in range(4)] == docs
    for a, b in zip(cols.online(np.arange(4)), back.online(np.arange(4)), strict=True):
        np.testing.assert_array_equal(a, b)
    later = (np.array([1, 2]), np.array([300.0, 305.0]), np.array([0.5, -0.5]))
    assert _fields_of(cols.observe(*later)) == _fields_of(back.observe(*later))


def test_a_reference_book_entry_restores():
    tracker, book = ResidualTracker(HORIZONS), {}
    yhat = [float(i) for i in range(24)]
    tracker.expect(book, Prediction("a", 0.0, 0.0, "m", 1, 60.0, yhat, yhat, yhat, 0))
    tracker.observe(book, "a", 60.0, 1.0)
    cols = ScoreColumns(HORIZONS, capacity=1)
    cols.from_doc(0, orjson.loads(orjson.dumps(book["m@1"])))
    assert plain_doc(cols, 0)["pending"] == {"6": [[360.0, 5.0, 5.0, 5.0, 30.0]],
                                         "24": [[1440.0, 23.0, 23.0, 23.0, 30.0]]}  # fmt: skip
    assert cols.online(np.array([0]))[2].tolist() == [[1, 0, 0]]


def _fields_of(scored) -> list:
    return [np.asarray(getattr(scored, f)).tolist() for f in scored.__slots__]


def test_grow_keeps_the_slots_and_reset_forgets():
    cols = ScoreColumns(HORIZONS, capacity=2)
    yhat = np.arange(48.0).reshape(2, 24)
    cols.expect(np.array([0, 1]), np.zeros(2), np.ones(2), yhat, yhat, yhat, "shadow")
    cols.observe(np.array([0, 1]), np.ones(2), np.array([0.0, 24.0]))
    before = [plain_doc(cols, s) for s in (0, 1)]
    cols.grow(5)
    assert cols.capacity == 5 and [plain_doc(cols, s) for s in (0, 1)] == before
    assert plain_doc(cols, 4) == {"stage": "production", "pending": {}, "mae": {}, "coverage": {},
                              "n": {}}  # fmt: skip
    cols.expect(np.array([4]), np.zeros(1), np.ones(1), yhat[:1], yhat[:1], yhat[:1], "shadow")
    assert cols.observe(np.array([1, 4]), np.full(2, 6.0), np.zeros(2)).index.tolist() == [0, 1]
    cols.reset(np.array([0]))
    assert plain_doc(cols, 0)["pending"] == {} and np.isnan(cols.online(np.array([0]))[0]).all()
    assert plain_doc(cols, 1)["n"] == {"1": 1, "6": 1}


@pytest.mark.parametrize("labels", [(), ("model",)])
def test_observe_many_matches_observe_per_value(labels):
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.exponential(2, 500), [0.01, 0.05, 100, 1e9, -1.0, math.nan]])
    exposition = []
    for many in (False, True):
        registry = CollectorRegistry()
        histogram = Histogram("h", "h", labels, buckets=(0.01, 0.05, 0.5, 1, 5, 100),
                              registry=registry)  # fmt: skip
        child = histogram.labels("m") if labels else histogram
        for chunk in np.array_split(values, 4):
            if many:
                observe_many(child, chunk)
            else:
                for v in chunk.tolist():
                    child.observe(v)
        observe_many(child, np.array([]))
        exposition.append(
            [line for line in generate_latest(registry).splitlines() if b"_created" not in line]
        )
    assert exposition[0] == exposition[1]

"""The worker's online adaptation (:mod:`streams.adaptation` inside the engine): intervals
that learn from the actuals as they arrive, never from an actual that did not exist when
a forecast was issued, kept through a restart."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest

from models.base import ModelSet
from models.baseline import SeasonalNaive
from models.online import OnlineConfig, knot_weights
from streams.engine import Engine
from streams.pipeline import RawRecord
from streams.snapshots import unpack
from streams.validate import Limits

NOW = 2e9
SENSORS = 4


def ar_batches(readings: int, per_batch: int, seed: int = 0) -> list[list[RawRecord]]:
    """Mean-reverting series (AR(1), coefficient 0.5), hourly, one record per reading,
    ``per_batch`` readings per sensor per batch (a batch holds several rounds of each)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(SENSORS, readings))
    values = np.zeros_like(noise)
    for t in range(1, readings):
        values[:, t] = 0.5 * values[:, t - 1] + noise[:, t]
    batches, offset = [], 0
    for start in range(0, readings, per_batch):
        batch = []
        for t in range(start, min(start + per_batch, readings)):
            for s in range(SENSORS):
                doc = {"sensor_id": f"s{s}", "ts": 1.6e9 + 3600 * t, "value": float(values[s, t])}
                batch.append(RawRecord("readings", 0, offset, b"k", orjson.dumps(doc)))
                offset += 1
        batches.append(batch)
    return batches


def engine(online: OnlineConfig | None, load=lambda sensor_id: None) -> Engine:
    return Engine(
        lambda: ModelSet(SeasonalNaive(horizon=6, season=1)),
        Limits(sensor_patterns=("s*",)),
        7200.0,
        load,
        clock=lambda: NOW,
        horizons=(1, 6),
        capacity=2,
        online=online,
    )


def run(eng: Engine, batches: list[list[RawRecord]]) -> tuple[list[tuple], list]:
    predictions, residuals = [], []
    for batch in batches:
        out = eng.process(batch)
        predictions += out.predictions.rows() if out.predictions else []
        residuals += [r for b in out.residuals for r in b.scored.residuals(["?"] * 10**6, "", 0)]
    return predictions, residuals


ADAPT = OnlineConfig(2, interval_rate=0.05)


def test_knots_interpolate_between_the_tracked_steps() -> None:
    weights = knot_weights((1, 6, 24), 30)
    learned = np.array([0.0, 1.0, 3.0])
    at = weights @ learned
    assert weights.shape == (30, 3)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    assert at[0] == 0.0 and at[5] == 1.0 and at[23] == 3.0 and at[29] == 3.0
    assert at[3] == pytest.approx(0.6) and at[14] == pytest.approx(2.0)


def test_adaptation_moves_the_intervals_coverage_to_the_nominal_level_and_not_the_point() -> None:
    """The last value as the forecast of a mean-reverting series, with an interval that
    grows as for a random walk: at step 6 it covers nearly every actual; adapted, the 90%
    interval covers close to 90%, at step 1 too."""
    batches = ar_batches(1500, 25)
    plain, plain_scored = run(engine(None), batches)
    adapted, adapted_scored = run(engine(ADAPT), batches)
    assert [(p.sensor_id, p.ts, p.yhat) for p in adapted] == [
        (p.sensor_id, p.ts, p.yhat) for p in plain
    ]
    assert any(a.lower != p.lower for a, p in zip(adapted, plain, strict=True))

    def coverage(scored: list, horizon: int) -> float:
        late = [r for r in scored if r.horizon == horizon][len(scored) // 4 :]
        return float(np.mean([r.lower <= r.actual <= r.upper for r in late]))

    static, online = coverage(plain_scored, 6), coverage(adapted_scored, 6)
    print(f"step-6 coverage: static {static:.3f}, adapted {online:.3f}")
    assert static > 0.97
    assert abs(online - 0.9) < 0.04
    assert abs(coverage(adapted_scored, 1) - 0.9) < 0.04


def test_a_forecast_never_learns_from_an_actual_that_came_after_it() -> None:
    """Whole stretches of each sensor in one batch: changing the readings from ``cut`` on
    leaves every forecast issued before ``cut`` as it was."""
    batches = ar_batches(400, 200)  # two batches of 200 rounds each
    cut = 150  # inside the first batch
    changed = []
    for number, batch in enumerate(batches):
        new = []
        for i, record in enumerate(batch):
            doc = orjson.loads(record.value)
            if number * 200 + i // SENSORS >= cut:
                doc["value"] += 50.0 * (1 + i % 3)
            new.append(dataclasses.replace(record, value=orjson.dumps(doc)))
        changed.append(new)
    first, _ = run(engine(ADAPT), batches)
    second, _ = run(engine(ADAPT), changed)
    before = [p for p in first if p.ts < 1.6e9 + 3600 * cut]
    assert before and before == [p for p in second if p.ts < 1.6e9 + 3600 * cut]
    assert first != second


def test_the_adapted_state_is_kept_in_the_snapshots_through_a_restart() -> None:
    batches = ar_batches(600, 40)
    straight, _ = run(engine(ADAPT), batches)
    eng = engine(ADAPT)
    head, _ = run(eng, batches[:8])
    saved = eng.release()
    doc = unpack(saved["s0"])
    assert doc["online"]["baseline@1"]["pairs"] > 0
    again = engine(ADAPT, load=lambda sensor_id: unpack(saved[sensor_id]))
    tail, _ = run(again, batches[8:])
    assert head + tail == straight
    forgetful = engine(ADAPT, load=lambda sensor_id: {**unpack(saved[sensor_id]), "online": {}})
    assert head + run(forgetful, batches[8:])[0] != straight

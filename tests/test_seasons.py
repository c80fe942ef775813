"""The serving baseline learns each sensor's step and daily season from its own times
(``FORECAST_SEASON=0``, the default): the reference forecaster, its columnar form, and the
same rule as training's (``models.data.detect_season``)."""

from __future__ import annotations

import numpy as np
import pytest

from models.baseline import MAX_SEASON, SeasonalNaive
from models.columns import columns_for, interval_rows
from models.data import detect_season, detect_step, load_wide_csv
from models.serving import ModelWatcher
from streams.state import SensorState
from tests.conftest import ROOT

BANK_CALLS = ROOT.parent / "shared" / "data" / "bank_calls" / "bank_calls.csv"
START = 1_700_006_400.0  # a midnight, UTC


def replay(model: SeasonalNaive, ts: np.ndarray, values: np.ndarray) -> dict:
    state = model.init_state()
    for t, v in zip(ts.tolist(), values.tolist(), strict=True):
        model.update(state, v, t)
    return state


@pytest.mark.parametrize(
    ("spacing", "season"),
    [(1800.0, 48), (3600.0, 24), (300.0, 288), (86_400.0, 7), (10.0, MAX_SEASON)],
)
def test_the_season_is_a_day_of_the_sensors_readings(spacing: float, season: int) -> None:
    ts = START + 37.0 + spacing * np.arange(int(4 * 86_400 / spacing) + 30)
    jitter = np.random.default_rng(0).uniform(-0.02, 0.02, len(ts)) * min(spacing, 60)
    state = replay(SeasonalNaive(horizon=3, season=None), ts + jitter, np.zeros(len(ts)))
    assert state["season"] == season
    assert len(state["history"]) == season


def test_half_hourly_readings_repeat_yesterday_not_twelve_hours_ago() -> None:
    ts = START + 1800.0 * np.arange(48 * 3)
    values = np.sin(2 * np.pi * np.arange(len(ts)) / 48) + np.arange(len(ts)) % 48 / 10
    model = SeasonalNaive(horizon=48, season=0)
    yhat, _, _ = model.forecast(replay(model, ts, values))
    assert yhat == values[-48:].tolist()  # step h: the reading a day before its time
    fixed = SeasonalNaive(horizon=48, season=24)
    assert fixed.forecast(replay(fixed, ts, values))[0] != yhat


def test_business_hours_give_the_readings_of_a_business_day_as_training_does() -> None:
    series = load_wide_csv(BANK_CALLS)
    ts, values = series.ts[:5000], series.values[:5000, 0]
    state = replay(SeasonalNaive(horizon=24, season=None), ts, values)
    assert state["season"] == detect_season(ts, detect_step(ts)) == 169
    # Overnight and weekend gaps are gaps: the step stays five minutes.
    assert sorted(state["spacings"])[len(state["spacings"]) // 2] == 300.0


def test_a_gap_is_not_a_step() -> None:
    """The worker's step (the predictions' ``step_seconds``, the residuals' target times)
    is the median spacing of the latest readings, not the last spacing."""
    state = SensorState()
    for ts in [0.0, 300.0, 600.0, 900.0, 50_000.0, 50_300.0, 80_000.0]:
        state.observe(START + ts)
        assert state.step in (None, 300.0)
    assert state.step == 300.0


def test_columns_equal_the_reference_with_mixed_spacings_gaps_and_late_readings() -> None:
    forecaster = SeasonalNaive(horizon=30, season=None, max_season=64)
    rng = np.random.default_rng(1)
    columns = columns_for(forecaster, 2)
    columns.grow(8)
    spacing = np.array([1800.0, 3600.0, 300.0, 7200.0, 1800.0])
    states = [forecaster.init_state() for _ in spacing]
    clock = np.full(len(spacing), START)
    for t in range(900):
        slots = np.sort(rng.choice(len(spacing), int(rng.integers(1, 6)), replace=False))
        gap = np.where(rng.random(len(slots)) < 0.03, rng.integers(5, 40, len(slots)), 1)
        clock[slots] += spacing[slots] * gap + rng.uniform(-1, 1, len(slots))
        ts, values = clock[slots].copy(), rng.normal(size=len(slots))
        items = [(states[s], float(v), float(x)) for s, v, x in zip(slots, values, ts, strict=True)]
        want = forecaster.step(items)
        got = columns.advance(slots, values, ts)
        for i, expected in enumerate(want):
            assert interval_rows(got, i) == tuple(list(series) for series in expected)
        if t % 7 == 3:  # a late reading, two readings back
            slot, value = int(slots[0]), float(rng.normal())
            forecaster.correct(states[slot], value, 2, False)
            columns.correct(slot, value, 2, False)
    seasons = [state["season"] for state in states]
    assert seasons[2] == 64  # five-minute readings: capped
    assert all(0 < season <= 86_400 / step for season, step in zip(seasons, spacing, strict=True))
    assert columns.history.size == 64  # widened as the seasons were learned
    for slot, state in enumerate(states):
        doc = columns.to_doc(slot)
        assert doc.keys() == state.keys()
        for key, value in state.items():
            assert doc[key] is None if value is None else np.array_equal(doc[key], value), key


def test_a_fixed_seasons_snapshot_restores_and_the_season_is_learned_after() -> None:
    fixed = SeasonalNaive(horizon=4, season=24)
    ts = START + 1800.0 * np.arange(48 * 3)
    values = np.arange(len(ts), dtype=float) % 48
    old = replay(fixed, ts[:100], values[:100])
    learned = SeasonalNaive(horizon=4, season=None)
    columns = columns_for(learned, 1)
    columns.from_doc(0, old)
    state = {**learned.init_state(), **old}
    for t, v in zip(ts[100:].tolist(), values[100:].tolist(), strict=True):
        want = learned.step([(state, v, t)])[0]
        got = columns.advance(np.array([0]), np.array([v]), np.array([t]))
        assert interval_rows(got, 0) == tuple(want)
    assert state["season"] == columns.to_doc(0)["season"] == 48


def test_the_serving_default_learns_and_a_given_season_is_kept(tmp_path) -> None:
    from models.registry import Registry

    registry = Registry(tmp_path)
    assert ModelWatcher(registry, horizon=24, season=0).current.baseline.learns
    assert ModelWatcher(registry, horizon=24, season=24).current.baseline.season == 24
    with pytest.raises(ValueError):
        SeasonalNaive(season=-1)

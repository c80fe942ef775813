"""Online adaptation from delayed feedback: coverage under drift, the bias, its bounds,
its state, no look-ahead, the vectorised path against a per-sensor loop, and the bench."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bench.online import OnlinePlan, Raw, replay, run, scores
from forecast.cli import main
from forecast.errors import ConfigError
from models.online import OnlineAdapter, OnlineConfig, Pending
from tests.conftest import base_env

Z90 = 1.6449  # the N(0, 1) quantile at 0.95: a +-Z90 interval covers 90%


def _raw(readings: np.ndarray, horizon: int, half: float = Z90, level: float = 0.0) -> Raw:
    """A model that forecasts ``level`` with a fixed interval, over (T, C) readings."""
    origins = len(readings) - horizon
    channels = readings.shape[1]
    point = np.full((channels, origins, horizon), level)
    index = np.arange(origins)[:, None] + np.arange(1, horizon + 1)[None, :]
    targets = readings[index].transpose(2, 0, 1)
    return Raw(point, point - half, point + half, readings, 0, targets)


def _scored(raw: Raw, config: OnlineConfig, origins: slice) -> tuple:
    """(static, online) scores over a range of origins."""
    adapted = replay(raw, config)
    targets = raw.targets[:, origins]
    static = scores(raw.point[:, origins], raw.lower[:, origins], raw.upper[:, origins], targets)
    online = scores(*(a[:, origins] for a in adapted), targets)
    return static, online


def test_coverage_returns_to_nominal_after_a_variance_shift() -> None:
    rng = np.random.default_rng(1)
    sigma = np.r_[np.ones(1500), np.full(3000, 3.0)][:, None]
    raw = _raw(rng.normal(0.0, 1.0, (4500, 8)) * sigma, horizon=6)
    static, online = _scored(raw, OnlineConfig(6, interval_rate=0.05), slice(2000, None))
    assert static.coverage < 0.5  # the fixed interval is far too narrow after the shift
    assert abs(online.coverage - 0.9) < 0.02
    assert online.width == pytest.approx(2 * Z90 * 3.0, rel=0.15)


def test_coverage_is_nominal_from_the_start_on_every_sensor() -> None:
    rng = np.random.default_rng(2)
    scale = np.linspace(0.5, 2.0, 6)[None, :]
    raw = _raw(rng.standard_t(4, (6000, 6)) * scale, horizon=4)
    adapted = replay(raw, OnlineConfig(4, interval_rate=0.05))
    inside = (raw.targets >= adapted[1]) & (raw.targets <= adapted[2])
    assert np.all(np.abs(inside.mean((1, 2)) - 0.9) < 0.02)


def test_the_bias_removes_a_level_shift() -> None:
    rng = np.random.default_rng(3)
    shift = np.r_[np.zeros(500), np.full(2500, 0.8)][:, None]
    raw = _raw(rng.normal(0.0, 0.3, (3000, 3)) + shift, horizon=5)
    static, online = _scored(
        raw, OnlineConfig(5, bias_rate=0.02, interval_rate=0.05), slice(1500, None)
    )
    assert static.mse == pytest.approx(0.64 + 0.09, rel=0.05)
    assert online.mse < 0.1
    assert abs(online.coverage - 0.9) < 0.03


def test_an_adversarial_stretch_stays_within_the_bounds() -> None:
    config = OnlineConfig(3, bias_rate=0.5, error_clip=2.0, max_bias=1.5)
    adapter = OnlineAdapter(config, 2)
    adapter.set_scale(np.arange(2), np.array([1.0, 10.0]))
    rows, steps = np.repeat(np.arange(2), 3), np.tile(np.arange(3), 2)
    zero = np.zeros(6)
    for k in range(500):
        before = adapter.bias.copy()
        actual = np.full(6, 1e12 * (-1) ** (k // 50))
        adapter.update(rows, steps, zero, zero - 1, zero + 1, actual)
        moved = np.abs(adapter.bias - before)
        assert np.all(moved <= 0.5 * (2.0 + 1.5) * adapter.scale[:, None] + 1e-9)
        assert np.all(np.abs(adapter.bias) <= 1.5 * adapter.scale[:, None] + 1e-9)
        multipliers = np.exp(np.r_[adapter.log_lower, adapter.log_upper])
        assert np.all((multipliers >= 0.25 - 1e-12) & (multipliers <= 4.0 + 1e-12))
    adapter.update(rows, steps, zero, zero - 1, zero + 1, np.r_[np.nan, np.inf, -np.inf, 0, 0, 0])
    assert np.all(np.isfinite(adapter.bias)) and np.all(np.isfinite(adapter.log_upper))
    point, lower, upper = adapter.apply(
        np.arange(2), np.zeros((2, 3)), -np.ones((2, 3)), np.ones((2, 3))
    )
    assert np.all(np.isfinite(point)) and np.all(upper - lower <= 8.0 + 1e-9)


def test_snapshot_and_restore_round_trip_exactly() -> None:
    rng = np.random.default_rng(4)
    config = OnlineConfig(4, bias_rate=0.1, interval_rate=0.2)
    adapter = OnlineAdapter(config, 5)
    adapter.set_scale(np.arange(5), rng.uniform(0.5, 2.0, 5))
    _feed(adapter, rng, rounds=50)
    saved = adapter.snapshot()
    copy = OnlineAdapter(config)
    copy.restore(saved)
    _feed(adapter, np.random.default_rng(5), rounds=20)
    _feed(copy, np.random.default_rng(5), rounds=20)
    for name, value in adapter.snapshot().items():
        np.testing.assert_array_equal(value, copy.snapshot()[name])
        if name != "scale":  # what learns moved on; the snapshot was a copy, not a view
            assert not np.array_equal(value, saved[name])
    with pytest.raises(ConfigError):
        OnlineAdapter(OnlineConfig(5)).restore(saved)


def test_per_sensor_documents_round_trip_exactly() -> None:
    adapter = OnlineAdapter(OnlineConfig(3, bias_rate=0.2, interval_rate=0.3), 4)
    adapter.set_scale(np.arange(4), np.array([0.5, 1.0, 2.0, 4.0]))
    _feed(adapter, np.random.default_rng(11), rounds=30)
    docs = adapter.to_docs(np.array([3, 1]))
    other = OnlineAdapter(adapter.config, 2)
    for row, doc in enumerate(docs):
        other.from_doc(row, doc)
    for name, value in other.snapshot().items():
        np.testing.assert_array_equal(value, adapter.snapshot()[name][[3, 1]])
    other.from_doc(0, OnlineAdapter(OnlineConfig(5), 1).to_docs(np.array([0]))[0])
    assert other.pairs[0] == 0 and not other.bias[0].any()


def test_grow_keeps_the_learned_rows_and_adds_neutral_ones() -> None:
    adapter = OnlineAdapter(OnlineConfig(3, bias_rate=0.5), 2)
    _feed(adapter, np.random.default_rng(6), rounds=10)
    before = adapter.snapshot()
    adapter.grow(4)
    assert adapter.capacity == 4
    np.testing.assert_array_equal(adapter.bias[:2], before["bias"])
    forecast = np.ones((2, 3)), np.zeros((2, 3)), np.full((2, 3), 2.0)
    np.testing.assert_array_equal(
        np.stack(adapter.apply(np.array([2, 3]), *forecast)), np.stack(forecast)
    )


def test_a_forecast_sees_no_actual_after_its_issue() -> None:
    rng = np.random.default_rng(7)
    readings = rng.normal(0.0, 1.0, (400, 3))
    config = OnlineConfig(8, bias_rate=0.2, interval_rate=0.2)
    before = replay(_raw(readings, 8), config)
    issued = 200  # origin 200 is issued after reading 200
    altered = readings.copy()
    altered[issued + 1 :] += rng.normal(5.0, 3.0, altered[issued + 1 :].shape)
    after = replay(_raw(altered, 8), config)
    for kept, changed in zip(before, after, strict=True):
        np.testing.assert_array_equal(kept[:, : issued + 1], changed[:, : issued + 1])
        assert not np.allclose(kept[:, issued + 1], changed[:, issued + 1])


def test_pending_matures_what_a_per_sensor_queue_matures() -> None:
    rng = np.random.default_rng(8)
    horizon, sensors = 5, 4
    pending = Pending(horizon, sensors)
    queues: list[list] = [[] for _ in range(sensors)]  # (issued at, forecast (3, H))
    clocks = [-1] * sensors
    for _ in range(300):
        rows = np.flatnonzero(rng.random(sensors) < 0.6)  # sensors arrive on their own
        actual = rng.normal(size=len(rows))
        got = pending.arrive(rows, actual)
        expected = []
        for row, value in zip(rows, actual, strict=True):
            clocks[row] += 1
            for issued, forecast in queues[row]:
                step = clocks[row] - issued - 1
                if 0 <= step < horizon:
                    expected.append((row, step, *forecast[:, step], value))
        got = np.stack(got, 1)
        expected = np.array(expected).reshape(-1, 6)
        np.testing.assert_allclose(_by_row_and_step(got), _by_row_and_step(expected), rtol=1e-6)
        issuing = rows[rng.random(len(rows)) < 0.8]
        forecasts = rng.normal(size=(len(issuing), 3, horizon)).astype(np.float32)
        pending.issue(issuing, *forecasts.transpose(1, 0, 2))
        for row, forecast in zip(issuing, forecasts, strict=True):
            queues[row].append((clocks[row], forecast.astype(float)))


def test_the_vectorised_adapter_equals_a_per_sensor_loop() -> None:
    rng = np.random.default_rng(9)
    config = OnlineConfig(4, bias_rate=0.3, interval_rate=0.3, error_clip=1.5, max_bias=0.7)
    adapter = OnlineAdapter(config, 6)
    scale = rng.uniform(0.2, 3.0, 6)
    adapter.set_scale(np.arange(6), scale)
    reference = [[_Reference(config, s) for _ in range(4)] for s in scale]
    for _ in range(200):
        rows = rng.choice(6, size=rng.integers(1, 7), replace=False)
        steps = rng.integers(0, 4, len(rows))
        point = rng.normal(size=len(rows))
        lower, upper = point - rng.uniform(0, 2, len(rows)), point + rng.uniform(0, 2, len(rows))
        actual = point + rng.normal(0, 2, len(rows)) * scale[rows]
        adapter.update(rows, steps, point, lower, upper, actual)
        for row, step, *pair in zip(rows, steps, point, lower, upper, actual, strict=True):
            reference[row][step].update(*pair)
        forecast = rng.normal(size=(6, 4))
        got = np.stack(adapter.apply(np.arange(6), forecast, forecast - 1, forecast + 2))
        expected = [
            [
                reference[r][h].apply(forecast[r, h], forecast[r, h] - 1, forecast[r, h] + 2)
                for h in range(4)
            ]
            for r in range(6)
        ]
        np.testing.assert_allclose(got, np.array(expected).transpose(2, 0, 1), rtol=1e-12)


def test_a_pair_repeated_in_one_update_is_refused() -> None:
    adapter = OnlineAdapter(OnlineConfig(2), 1)
    with pytest.raises(ConfigError):
        adapter.update(np.array([0, 0]), np.array([1, 1]), *np.zeros((4, 2)))
    with pytest.raises(ConfigError):
        OnlineConfig(2, coverage=1.5)


def test_the_bench_runs_end_to_end_on_a_small_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _wide_csv(tmp_path / "small.csv", rows=800)
    plan = OnlinePlan(
        data, epochs=1, cache=tmp_path / "cache", lookback=48, horizon=12, hidden=4, origins=60
    )
    report = run(plan, OnlineConfig(12, bias_rate=0.05), lambda line: None)
    assert (report.name, report.channels, report.origins) == ("small", 2, 60)
    for scored in (report.static, report.online):
        assert math.isfinite(scored.mse) and 0.0 <= scored.coverage <= 1.0
    assert report.online != report.static
    for name, value in base_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    args = ["bench", "online", "--dataset", str(data), "--lookback", "48", "--horizon", "12"]
    args += ["--hidden", "4", "--train-epochs", "1", "--origins", "60"]
    args += ["--model-cache", str(tmp_path / "cache"), "--bias-rate", "0.05"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    online = next(line for line in lines if line.startswith("small") and "online" in line)
    assert float(online.split()[2]) == pytest.approx(report.online.mse, abs=1e-4)
    assert any(line.startswith("command: forecast bench online --dataset") for line in lines)


class _Reference:
    """One sensor's one step, the equations of :mod:`models.online` written plainly."""

    def __init__(self, config: OnlineConfig, scale: float) -> None:
        self.config, self.scale = config, scale
        self.bias = self.log_lower = self.log_upper = 0.0

    def apply(self, point: float, lower: float, upper: float) -> tuple[float, float, float]:
        floor = 1e-3 * self.scale
        centre = point + self.bias
        below = max(point - lower, floor) * math.exp(self.log_lower)
        above = max(upper - point, floor) * math.exp(self.log_upper)
        return centre, centre - below, centre + above

    def update(self, point: float, lower: float, upper: float, actual: float) -> None:
        """``point`` the model's own forecast; ``lower``/``upper`` the interval issued."""
        c = self.config
        lo, hi = math.log(c.min_width), math.log(c.max_width)
        missed_low, missed_high = actual < lower, actual > upper
        self.log_lower = min(
            hi, max(lo, self.log_lower + c.interval_rate * (missed_low - c.alpha / 2))
        )
        self.log_upper = min(
            hi, max(lo, self.log_upper + c.interval_rate * (missed_high - c.alpha / 2))
        )
        clip = c.error_clip * self.scale
        error = min(clip, max(-clip, actual - point))
        cap = c.max_bias * self.scale
        self.bias = min(cap, max(-cap, self.bias + c.bias_rate * (error - self.bias)))


def _by_row_and_step(pairs: np.ndarray) -> np.ndarray:
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _feed(adapter: OnlineAdapter, rng: np.random.Generator, rounds: int) -> None:
    """Random matured pairs for every (row, step), ``rounds`` times."""
    rows = np.repeat(np.arange(adapter.capacity), adapter.config.horizon)
    steps = np.tile(np.arange(adapter.config.horizon), adapter.capacity)
    for _ in range(rounds):
        point = rng.normal(size=len(rows))
        adapter.update(
            rows, steps, point, point - 1, point + 1, point + rng.normal(0.5, 2, len(rows))
        )


def _wide_csv(path: Path, rows: int) -> Path:
    """Two hourly channels: a daily cycle plus noise."""
    rng = np.random.default_rng(10)
    t = np.arange(rows)
    start = 1_700_000_000 - 1_700_000_000 % 3600
    a = np.sin(2 * np.pi * t / 24) + rng.normal(0, 0.2, rows)
    b = 3 + np.cos(2 * np.pi * t / 24) + rng.normal(0, 0.3, rows) + 0.002 * t
    lines = ["time,a,b"] + [f"{start + 3600 * i},{a[i]:.5f},{b[i]:.5f}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path

"""Residual tracking, drift detectors and the retraining policy (pure logic)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from forecast.schemas import DriftEvent, Prediction, Reading
from forecast.settings import load_settings
from streams.drift import DriftConfig, DriftMonitor
from streams.residuals import ResidualTracker
from streams.retrain import Retrainer


def prediction(ts: float, yhat: list[float], model: str = "m", stage: str = "production"):
    lower = [y - 1 for y in yhat]
    upper = [y + 1 for y in yhat]
    return Prediction("s", ts, ts, model, 1, 60.0, yhat, lower, upper, 1, stage)


def test_each_tracked_step_meets_the_reading_at_its_target_time() -> None:
    tracker = ResidualTracker((1, 3))
    book: dict = {}
    tracker.expect(book, prediction(0.0, [10.0, 20.0, 30.0]))
    assert tracker.observe(book, "s", 60.0, 11.5)[0].horizon == 1
    assert tracker.observe(book, "s", 120.0, 0.0) == []  # step 2 is not tracked
    (third,) = tracker.observe(book, "s", 181.0, 29.0)  # within half a step
    assert (third.horizon, third.error, third.covered) == (3, -1.0, True)
    assert book["m@1"]["pending"] == {"1": [], "3": []}
    (_, _, h, mae, coverage), _ = tracker.online(book)
    assert (h, mae, coverage) == ("1", 1.5, 0.0)


def test_steps_whose_reading_never_came_are_dropped() -> None:
    tracker = ResidualTracker((1, 2))
    book: dict = {}
    for t in range(0, 600, 60):  # forecasts every minute, no reading ever matches
        tracker.expect(book, prediction(float(t), [1.0, 2.0]))
    tracker.observe(book, "s", 10_000.0, 1.0)
    assert book["m@1"]["pending"] == {"1": [], "2": []}


def test_production_and_shadow_are_scored_apart_and_stale_models_forgotten() -> None:
    tracker = ResidualTracker((1,))
    book: dict = {}
    tracker.expect(book, prediction(0.0, [1.0], "lstm"))
    tracker.expect(book, prediction(0.0, [5.0], "tft", stage="shadow"))
    done = {r.model: r for r in tracker.observe(book, "s", 60.0, 2.0)}
    assert (done["lstm"].error, done["tft"].error, done["tft"].stage) == (1.0, -3.0, "shadow")
    tracker.prune(book, {"lstm@1"})
    assert set(book) == {"lstm@1"}


def readings(values: np.ndarray) -> list[Reading]:
    return [Reading("s", 3600.0 * i, float(v)) for i, v in enumerate(values)]


def test_a_level_shift_fires_page_hinkley_once() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0, 1, 1000)
    values[600:] += 5
    monitor = DriftMonitor(DriftConfig(detectors=("page_hinkley",)))
    events = [e for r in readings(values) for e in monitor.observe(r)]
    assert [e.signal for e in events] == ["level"]
    assert 600 <= events[0].ts / 3600 < 650
    assert events[0].to_message()["type"] == "drift"


def test_no_event_on_a_steady_series_and_residuals_feed_adwin() -> None:
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(DriftConfig(detectors=("adwin",)))
    tracker, book, fired = ResidualTracker((1,)), {}, []
    errors = np.concatenate([rng.normal(0, 1, 800), rng.normal(0, 6, 200)])
    for i, error in enumerate(errors):
        reading = Reading("s", 60.0 * i, float(error))
        done = tracker.observe(book, "s", reading.ts, reading.value)
        fired += [(i, e) for e in monitor.observe(reading, done[0] if done else None)]
        tracker.expect(book, prediction(reading.ts, [0.0]))
    assert fired and all(i >= 800 for i, _ in fired)
    assert fired[0][1].model == "m" and fired[0][1].signal == "residual"


def test_unknown_detectors_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown detectors"):
        DriftConfig(detectors=("cusum",))


def event(
    sensor: str, ts: float, signal: str = "level", detector: str = "page_hinkley"
) -> DriftEvent:
    return DriftEvent(sensor, ts, detector, signal, "", 0)


def policy(**settings: float) -> tuple[Retrainer, list[list[str]]]:
    """A retrainer whose retraining only records the sensors it was started for."""
    started: list[list[str]] = []
    retrainer = Retrainer(load_settings(**settings), store=None, registry=None, clock=lambda: 0.0)

    async def record(sensors: list[str]) -> None:
        started.append(sensors)

    retrainer.retrain = record
    return retrainer, started


async def test_the_policy_needs_several_sensors_within_the_window() -> None:
    retrainer, started = policy(retrain_sensors=3, retrain_window=3600, retrain_cooldown=600)
    retrainer.notice([event("a", 0), event("b", 5000)])  # too far apart
    retrainer.notice([event("c", 5100, "distribution")])  # not a triggering signal
    assert retrainer.training is None
    retrainer.notice([event("d", 5300), event("c", 5200)])  # one batch, taken in time order
    await asyncio.sleep(0)
    assert started == [["b", "c", "d"]]
    retrainer.notice([event(s, 6000) for s in "efg"])  # enough again, but cooling down
    await asyncio.sleep(0)
    assert started == [["b", "c", "d"]]


async def test_the_policy_counts_events_whatever_order_the_workers_send_them_in() -> None:
    """Two workers replaying at their own pace: one's events arrive days of sensor time
    ahead of the other's; the window still finds the sensors that drifted together."""
    retrainer, started = policy(retrain_sensors=4, retrain_window=3600, retrain_cooldown=0)

    def residual(sensor: str, ts: float) -> DriftEvent:
        return event(sensor, ts, "residual", "adwin")

    day = 86_400.0
    retrainer.notice([residual("a", 10 * day), residual("b", 10 * day + 60)])  # the shift, worker A
    retrainer.notice([residual("a", 13 * day), residual("b", 14 * day)])  # worker A, days later
    retrainer.notice([residual("x", 2 * day)])  # worker B, a lone event before the shift
    assert retrainer.training is None
    retrainer.notice([residual("c", 10 * day + 900), residual("d", 10 * day + 1200)])  # B's shift
    await asyncio.sleep(0)
    assert started == [["a", "b", "c", "d"]]

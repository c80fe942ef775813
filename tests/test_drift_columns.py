"""DriftColumns emits, slot by slot, exactly what DriftMonitor emits reading by reading."""

from __future__ import annotations

import math

import numpy as np
import pytest
from river import drift

from streams.drift import (
    DriftColumns,
    DriftConfig,
    DriftMonitor,
    _PageHinkleyColumns,
    _Reference,
    _ReferenceColumns,
)

MODELS = ("lstm", "tft")


def streams(rng: np.random.Generator, sensors: int, length: int, nan: float) -> dict:
    """Per sensor: values with level shifts (up and down) and variance changes, and
    residuals whose spread changes, NaN (no residual) with probability ``nan``."""
    values = rng.normal(0, 1, (sensors, length)) * rng.uniform(0.5, 3, (sensors, 1))
    values += rng.uniform(-50, 50, (sensors, 1))
    errors = rng.normal(0, 1, (sensors, length))
    for s in range(sensors):
        for start in rng.integers(0, length, rng.integers(1, 5)):
            values[s, start:] += rng.choice([-1, 1]) * rng.uniform(2, 8)
        for start in rng.integers(0, length, rng.integers(0, 3)):
            values[s, start:] *= rng.uniform(0.2, 4)
            errors[s, start:] *= rng.uniform(2, 8)
    errors[rng.random((sensors, length)) < nan] = np.nan
    versions = rng.integers(1, 4, (sensors, length))
    models = rng.integers(0, len(MODELS), (sensors, length))
    return {"values": values, "errors": errors, "versions": versions, "models": models}


def run(
    config: DriftConfig,
    seed: int,
    sensors: int = 50,
    length: int = 600,
    nan: float = 0.3,
    capacity: int | None = None,
    resets: int = 0,
) -> list:
    """Feeds both in random calls (random subsets of sensors, random slots); returns
    the events of each, ``(call, index, event)``, after checking they are the same."""
    rng = np.random.default_rng(seed)
    data = streams(rng, sensors, length, nan)
    slot_of = rng.permutation(sensors)
    names = [f"s{s}" for s in range(sensors)]
    columns = DriftColumns(config, capacity or sensors)
    monitor = DriftMonitor(config)
    position = np.zeros(sensors, np.int64)
    reset_at = set(rng.integers(1, 4 * length, resets).tolist())
    expected, got, call = [], [], 0
    while (position < length).any():
        left = np.flatnonzero(position < length)
        chosen = rng.permutation(left)[: rng.integers(1, len(left) + 1)]
        if capacity and slot_of[chosen].max() >= columns.capacity:
            columns.grow(columns.capacity + sensors)
        if call in reset_at:
            renamed = rng.choice(sensors, rng.integers(1, sensors // 4 + 2), replace=False)
            columns.reset(slot_of[renamed])
            for s in renamed.tolist():
                names[s] += "'"  # a new sensor for the monitor
        k = position[chosen]
        batch = {
            "slots": slot_of[chosen],
            "sensor_ids": [names[s] for s in chosen.tolist()],
            "ts": 60.0 * k + chosen,
            "values": data["values"][chosen, k],
            "errors": data["errors"][chosen, k],
            "models": [MODELS[m] for m in data["models"][chosen, k].tolist()],
            "versions": data["versions"][chosen, k].tolist(),
        }
        for i in range(len(chosen)):
            error = float(batch["errors"][i])
            for event in monitor.observe_value(
                batch["sensor_ids"][i],
                float(batch["ts"][i]),
                float(batch["values"][i]),
                None if math.isnan(error) else error,
                batch["models"][i],
                batch["versions"][i],
            ):
                expected.append((call, i, event))
        got += [(call, i, event) for i, event in columns.observe(**batch)]
        position[chosen] += 1
        call += 1
    assert got == expected
    for _, _, event in got:
        assert all(type(v) is float for v in event.detail.values())
        assert type(event.ts) is float and type(event.model_version) is int
    return got


def detectors(events: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, _, event in events:
        counts[event.detector] = counts.get(event.detector, 0) + 1
    return counts


def test_the_default_config() -> None:
    events = run(DriftConfig(), seed=1, length=800)
    counts = detectors(events)
    assert counts["page_hinkley"] >= 20 and counts["adwin"] >= 10
    assert {e.model for _, _, e in events if e.detector == "adwin"} == set(MODELS)


@pytest.mark.parametrize("seed", [2, 3])
def test_page_hinkley_alone_with_frequent_events(seed: int) -> None:
    config = DriftConfig(detectors=("page_hinkley",), reference=20, cooldown=5, ph_threshold=8)
    events = run(config, seed=seed, nan=1.0)
    assert detectors(events)["page_hinkley"] >= 200
    assert all(e.model == "" and "error" not in e.detail for _, _, e in events)


def test_adwin_and_page_hinkley_with_and_without_residuals() -> None:
    config = DriftConfig(reference=30, cooldown=3, ph_threshold=10, adwin_delta=0.05)
    counts = detectors(run(config, seed=4, nan=0.5))
    assert counts["page_hinkley"] >= 100 and counts["adwin"] >= 30


def test_detections_while_cooling_down_reset_the_detector_as_river_does() -> None:
    # a cooldown beyond min_instances (30): River detects while quiet, then resets itself
    config = DriftConfig(
        detectors=("page_hinkley", "adwin"), reference=10, cooldown=45, ph_threshold=3
    )
    counts = detectors(run(config, seed=5, nan=0.0))
    assert counts["page_hinkley"] >= 100 and counts["adwin"] >= 10


def test_kswin_on_a_short_stream() -> None:
    config = DriftConfig(
        detectors=("kswin", "page_hinkley", "adwin"),
        reference=10,
        cooldown=2,
        ph_threshold=10,
        ks_window=40,
        ks_stat=15,
        ks_alpha=0.01,
    )
    counts = detectors(run(config, seed=6, sensors=10, length=200))
    assert counts["kswin"] >= 10 and counts["page_hinkley"] >= 20


def test_reset_slots_start_afresh_and_grow_keeps_them() -> None:
    config = DriftConfig(reference=20, cooldown=5, ph_threshold=8, adwin_delta=0.05)
    events = run(config, seed=7, capacity=8, resets=30)
    assert {e.sensor_id for _, _, e in events if e.sensor_id.endswith("'")}
    assert detectors(events)["page_hinkley"] >= 100


def test_page_hinkley_columns_are_bit_identical_to_river() -> None:
    config = DriftConfig(ph_threshold=5)
    rng = np.random.default_rng(8)
    x = np.cumsum(rng.normal(0, 1, (3, 400)), axis=1) * 0.1
    x[1, 100:] = np.nan  # NaN never counts as a new minimum or maximum
    columns = _PageHinkleyColumns(config, 3)
    rivers = [drift.PageHinkley(30, config.ph_delta, config.ph_threshold) for _ in range(3)]
    detections = 0
    for t in range(x.shape[1]):
        flags = columns.update(np.arange(3), x[:, t])
        for s, river in enumerate(rivers):
            river.update(float(x[s, t]))
            state = [river._x_mean.n, river._x_mean.get(), river._sum_increase]
            state += [river._sum_decrease, river._min_increase, river._max_decrease]
            mine = [columns.state[field][s] for field in columns._START]
            assert np.array_equal(state, mine, equal_nan=True)
            assert flags[s] == river.drift_detected
            detections += river.drift_detected
    assert detections >= 5


def test_reference_columns_sum_in_order_as_the_reference_does() -> None:
    rng = np.random.default_rng(9)
    x = 1e6 + rng.normal(0, 1, (200, 168)) * rng.uniform(1e-3, 1e3, (200, 1))
    x[0] = 7.0  # no spread: std 1.0
    columns = _ReferenceColumns(168, 200)
    slots = np.arange(200)
    for t in range(168):
        ready, _ = columns.standardise(slots, x[:, t])
        assert not len(ready)
    references = [_Reference(168) for _ in slots]
    for row, reference in zip(x, references, strict=True):
        for value in row.tolist():
            reference.standardise(value)
    assert columns.mean.tolist() == [r.mean for r in references]
    assert columns.std.tolist() == [r.std for r in references]
    assert columns.std[0] == 1.0 and len(columns.pool) == 0  # the values are let go
    pairwise = np.sqrt(np.sum((x - columns.mean[:, None]) ** 2, axis=1) / 168)
    assert (pairwise != columns.std).sum() >= 10  # so summing in order matters here
    ready, standardised = columns.standardise(slots, x[:, 1])
    expected = [r.standardise(v) for r, v in zip(references, x[:, 1].tolist(), strict=True)]
    assert ready.tolist() == slots.tolist() and standardised.tolist() == expected

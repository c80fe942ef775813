"""The columnar engine gives what the reference batch processor gives, batch by batch:
the same predictions (all fields, in order), stored readings, rejections, outcomes,
fallbacks, residuals and drift events, on the same records."""

from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np
import orjson
import pytest
import torch

from forecast.options import DriftConfig
from models.base import ModelSet
from models.baseline import SeasonalNaive
from models.columns import SEQUENCE_ROUNDS
from models.lstm import LinearLSTMNet, LSTMForecaster
from streams.drift import DriftMonitor
from streams.engine import Engine
from streams.pipeline import BatchProcessor, RawRecord
from streams.residuals import ResidualTracker
from streams.snapshots import unpack
from streams.state import SensorState
from streams.validate import Limits

NOW = 2e9


def lstm(lookback: int = 12, horizon: int = 6, seed: int = 0) -> LSTMForecaster:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = LinearLSTMNet(lookback, horizon, 8, rng.normal(size=(lookback, horizon)) * 0.05)
    torch.nn.init.normal_(net.head.weight, std=0.1)
    return LSTMForecaster(net, 3, np.linspace(1.0, 2.0, horizon))


def records(seed: int, sensors: int, batches: int, per_record: int) -> list[list[RawRecord]]:
    """Batches of records over ``sensors`` hourly series, with late readings, repeats,
    readings too late, bad elements and a level shift half-way."""
    rng = np.random.default_rng(seed)
    clock = {f"s{i}": 1.6e9 + 3600 * i for i in range(sensors)}
    out, offset = [], 0
    for b in range(batches):
        batch = []
        for _ in range(int(rng.integers(1, 6) if per_record > 1 else rng.integers(20, 60))):
            elements = []
            for _ in range(per_record):
                sensor = f"s{int(rng.integers(sensors))}"
                roll = rng.random()
                if roll < 0.05:
                    ts = clock[sensor] - 3600 * int(rng.integers(0, 4))  # late or a repeat
                elif roll < 0.06:
                    ts = clock[sensor] - 3600 * 1000  # too late
                else:
                    clock[sensor] += 3600 * (1 if rng.random() < 0.9 else 3)
                    ts = clock[sensor]
                level = 5.0 if b > batches // 2 else 0.0
                value = float(np.sin(ts / 20000) + level + rng.normal() * 0.1)
                elements.append({"sensor_id": sensor, "ts": ts, "value": value})
            if rng.random() < 0.05:
                elements.append({"sensor_id": "bad id!", "ts": 1.6e9, "value": 1})
            value = orjson.dumps(elements if per_record > 1 else elements[0])
            batch.append(RawRecord("readings", offset % 3, offset, b"k", value))
            offset += 1
        out.append(batch)
    return out


def close(got: object, want: object) -> bool:
    """Equal, but for floats anywhere inside (dataclasses, sequences, mappings), which
    may differ by a relative 1e-5 (NaN equals NaN)."""
    if isinstance(got, float) and isinstance(want, float):
        return math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6) or (got != got and want != want)
    if dataclasses.is_dataclass(got) and type(got) is type(want):
        return close(dataclasses.astuple(got), dataclasses.astuple(want))
    if isinstance(got, list | tuple) and isinstance(want, list | tuple):
        return len(got) == len(want) and all(map(close, got, want))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(close(got[k], want[k]) for k in got)
    return got == want


def residual_rows(residuals) -> list[tuple]:
    return sorted(
        (
            r.sensor_id,
            r.model,
            r.model_version,
            r.stage,
            r.horizon,
            r.target_ts,
            r.actual,
            r.yhat,
            r.lower,
            r.upper,
        )
        for r in residuals
    )


def engine_residuals(out, ids_of) -> list:
    rows = []
    for batch in out.residuals:
        rows += batch.scored.residuals(ids_of, batch.model, batch.version)
    return rows


@pytest.mark.parametrize(
    ("seed", "production", "per_record"),
    [(0, False, 100), (1, True, 100), (2, True, 1), (3, True, 20)],
)
def test_the_engine_equals_the_reference_batch_by_batch(
    seed: int, production: bool, per_record: int
) -> None:
    models = ModelSet(SeasonalNaive(horizon=6, season=4), lstm() if production else None)
    compare(models, records(seed, 9, 20, per_record))


def test_a_baseline_learning_each_sensors_season_equals_the_reference() -> None:
    models = ModelSet(SeasonalNaive(horizon=6, season=None, max_season=30))
    compare(models, records(7, 9, 20, 20))


def test_a_shadow_and_a_model_with_a_cadence_equal_the_reference() -> None:
    from tests.test_units import EveryOther

    models = ModelSet(SeasonalNaive(horizon=3, season=4), EveryOther(), lstm(horizon=3))
    compare(models, records(4, 5, 25, 10), drift=False)


def test_a_restarted_engine_restores_its_sensors_and_goes_on_as_the_reference() -> None:
    models = ModelSet(SeasonalNaive(horizon=6, season=4), lstm())
    batches = records(5, 9, 30, 20)
    compare(models, batches, restart_at=(10, 20), drift=False)  # detectors warm up again


def test_the_lstm_in_one_pass_per_batch_gives_the_reference_up_to_rounding() -> None:
    """The default engine: from four rounds on, the LSTM takes each sensor's readings of
    a batch in one recurrent pass, a different order of float operations."""
    models = ModelSet(SeasonalNaive(horizon=6, season=4), lstm())
    compare(models, records(3, 9, 20, 20), exact=False)


def compare(
    models: ModelSet,
    batches: list[list[RawRecord]],
    drift: bool = True,
    restart_at: tuple[int, ...] = (),
    exact: bool = True,
) -> None:
    """Both on the same batches; with ``restart_at``, the engine starts afresh before
    those batches and restores its sensors from its snapshots. ``exact``: the engine
    steps the LSTM round by round, as the reference, and every float is equal; else
    floats agree to a relative 1e-5."""
    same = operator.eq if exact else close
    limits = Limits(sensor_patterns=("s*",))
    config = DriftConfig(reference=20, cooldown=5, ph_threshold=5.0)
    states: dict[str, SensorState] = {}
    reference = BatchProcessor(
        lambda: models,
        limits,
        7200.0,
        states.get,
        clock=lambda: NOW,
        tracker=ResidualTracker(),
        drift=DriftMonitor(config) if drift else None,
    )
    snapshots: dict[str, bytes] = {}

    def start() -> Engine:
        def load(sensor_id: str) -> dict | None:
            doc = snapshots.pop(sensor_id, None)
            return None if doc is None else unpack(doc)

        return Engine(
            lambda: models,
            limits,
            7200.0,
            load,
            clock=lambda: NOW,
            drift=config if drift else None,
            capacity=2,
            sequence_rounds=10**9 if exact else SEQUENCE_ROUNDS,
        )

    engine = start()
    drift_seen = 0
    for number, batch in enumerate(batches):
        if number in restart_at:
            snapshots = engine.release()
            engine = start()
        want = reference.process(batch)
        for sensor_id, (_, state) in want.touched.items():
            states[sensor_id] = state
        got = engine.process(batch)
        assert same(got.predictions.rows() if got.predictions else [], want.predictions)
        assert same(got.shadow.rows() if got.shadow else [], want.shadow)
        assert (got.readings.rows() if got.readings else []) == want.readings
        assert got.rejected == want.rejected
        assert +got.outcomes == +want.outcomes
        assert +got.fallbacks == +want.fallbacks
        assert same(got.drift, want.drift)
        assert got.touched == {s: p for s, (p, _) in want.touched.items()}
        drift_seen += len(want.drift)
        positions = _positions(batch)
        got_res = engine_residuals(got, positions)
        assert same(residual_rows(got_res), residual_rows(want.residuals))
        for sensor_id in got.touched:
            mine = unpack(engine.snapshot(sensor_id))
            theirs = states[sensor_id]
            assert (mine["last_ts"], mine["step"], mine["seq"], tuple(mine["source"])) == (
                theirs.last_ts,
                theirs.step,
                theirs.seq,
                theirs.source,
            )
            assert mine["recent"].tolist() == theirs.recent
    assert drift_seen > 0 or not drift


def _positions(batch: list[RawRecord]) -> list[str]:
    """The sensor id of each valid reading of the batch, by position."""
    from streams.validate import parse_records

    return parse_records([r.value for r in batch], Limits(sensor_patterns=("s*",)), NOW).sensor_id

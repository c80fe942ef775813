"""Forecasters: streaming equals offline, a contract every model keeps, the registry."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from forecast.errors import ModelError
from models.baseline import SeasonalNaive
from models.data import load_wide_csv, protocol_split
from models.registry import Registry
from models.serving import ModelWatcher
from models.train import TrainConfig, offline_forecasts, train_lstm
from streams.pipeline import BatchProcessor, ModelSet, RawRecord
from streams.state import SensorState
from streams.validate import Limits
from tests.conftest import ETTH1

CONFIG = TrainConfig(lookback=48, horizon=12, hidden=8, epochs=2, patience=2, chunk=64)


@pytest.fixture(scope="module")
def split():
    return protocol_split(load_wide_csv(ETTH1), CONFIG.lookback)


@pytest.fixture(scope="module")
def trained(split):
    return train_lstm(split, CONFIG)


def register(registry: Registry, trained, name: str = "lstm") -> int:
    artifact = {
        "kind": "linear-lstm",
        "config": asdict(CONFIG),
        "state_dict": trained.net.state_dict(),
        "quantiles": torch.as_tensor(trained.quantiles),
    }
    return registry.register(name, artifact, {"kind": "linear-lstm", "metrics": {}})


def test_streaming_gives_the_offline_forecasts(trained, split, tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    forecaster = registry.load("lstm", register(registry, trained))
    values, ts = split.test
    values, ts = values[:200], ts[:200]
    offline, _, _ = offline_forecasts(trained.net, values, ts)
    states = [forecaster.init_state() for _ in range(values.shape[1])]
    streamed: list[list] = [[] for _ in states]
    channel = {id(state): c for c, state in enumerate(states)}
    for start in range(0, len(values), 37):  # uneven micro-batches, all channels interleaved
        items = [
            (states[c], float(values[t, c]), float(ts[t]))
            for t in range(start, min(start + 37, len(values)))
            for c in range(values.shape[1])
        ]
        for (state, _, _), out in zip(items, forecaster.step(items), strict=True):
            if out is not None:
                streamed[channel[id(state)]].append(out[0])
    stream = torch.tensor(streamed)[:, : offline.shape[1]]
    assert stream.shape == offline.shape
    assert torch.allclose(stream, offline, atol=1e-4), (stream - offline).abs().max()


def test_training_is_deterministic_with_a_seed(trained, split) -> None:
    again = train_lstm(split, CONFIG)
    for name, tensor in trained.net.state_dict().items():
        assert torch.equal(tensor, again.net.state_dict()[name]), name
    assert trained.test.mse == again.test.mse


def test_training_never_ends_worse_than_its_ridge_start(trained) -> None:
    assert trained.history[0]["epoch"] == 0
    assert trained.valid.mse <= trained.history[0]["valid_mse"] + 1e-6
    assert 0.8 <= trained.valid.coverage <= 0.95  # split-conformal at 90%


# -- the contract every forecaster keeps ---------------------------------------------------


@pytest.fixture(params=["baseline", "lstm", "tft"])
def forecaster(request, trained, tmp_path: Path):
    if request.param == "baseline":
        return SeasonalNaive(horizon=12, season=24)
    registry = Registry(tmp_path)
    if request.param == "tft":
        tft = request.getfixturevalue("tiny_tft")
        return registry.load("tft", registry.register("tft", tft.artifact, tft.meta))
    return registry.load("lstm", register(registry, trained))


def test_contract_shapes_intervals_and_warm_up(forecaster) -> None:
    rng = np.random.default_rng(0)
    state = forecaster.init_state()
    series = 10 + np.sin(np.arange(100) / 24 * 2 * np.pi) + rng.normal(0, 0.1, 100)
    outputs = forecaster.step([(state, float(v), 1e9 + 3600 * i) for i, v in enumerate(series)])
    ready = [o for o in outputs if o is not None]
    assert ready, "a forecaster must forecast once it has seen enough"
    assert outputs[-1] is not None
    for yhat, lower, upper in ready:
        assert len(yhat) == len(lower) == len(upper) == forecaster.horizon
        assert all(math.isfinite(v) for v in yhat)
        assert all(lo <= y <= hi for lo, y, hi in zip(lower, yhat, upper, strict=True))


def test_contract_state_round_trips_through_json(forecaster) -> None:
    state = forecaster.init_state()
    items = [(state, float(i % 24), 1e9 + 3600 * i) for i in range(60)]
    forecaster.step(items)
    copy = SensorState.from_bytes(SensorState(models={"m": state}).to_bytes()).models["m"]
    a = forecaster.step([(state, 3.0, 1e9 + 3600 * 60)])
    b = forecaster.step([(copy, 3.0, 1e9 + 3600 * 60)])
    assert a == b


def test_contract_same_state_twice_in_one_call_is_sequential(forecaster) -> None:
    one, two = forecaster.init_state(), forecaster.init_state()
    readings = [(float(i % 24), 1e9 + 3600 * i) for i in range(60)]
    together = forecaster.step([(one, v, t) for v, t in readings])
    apart = [forecaster.step([(two, v, t)])[0] for v, t in readings]
    for x, y in zip(together, apart, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert np.allclose(x[0], y[0], atol=1e-5)


# -- registry and serving ------------------------------------------------------------------


def test_registry_refuses_corrupt_and_incompatible_artifacts(trained, tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    good = register(registry, trained)
    bad = register(registry, trained)
    artifact = tmp_path / "lstm" / f"v{bad}" / "model.pt"
    artifact.write_bytes(artifact.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ModelError, match="checksum"):
        registry.load("lstm", bad)
    with pytest.raises(ModelError, match="checksum"):
        registry.promote("lstm", bad)
    foreign = registry.register("lstm", {"kind": "other", "config": {}}, {"metrics": {}})
    with pytest.raises(ModelError, match="incompatible"):
        registry.load("lstm", foreign)
    registry.promote("lstm", good)
    assert registry.stage("production").version == good


def test_watcher_swaps_on_promotion_and_keeps_serving_on_a_bad_version(
    trained, tmp_path: Path
) -> None:
    registry = Registry(tmp_path)
    first, second = register(registry, trained), register(registry, trained)
    watcher = ModelWatcher(registry, horizon=24, season=24)
    watcher.refresh()
    assert watcher.current.production is None
    registry.promote("lstm", first)
    assert watcher.refresh()
    assert watcher.current.production.version == first
    assert watcher.current.baseline.horizon == CONFIG.horizon  # the fallback matches
    registry.promote("lstm", second, "shadow")
    watcher.refresh()
    assert (watcher.current.production.version, watcher.current.shadow.version) == (first, second)
    # Corrupt the shadow's artifact, then make the registry point production at it.
    (tmp_path / "lstm" / f"v{second}" / "model.pt").write_bytes(b"garbage")
    state = registry.state()
    state["production"] = {"name": "lstm", "version": second}
    registry._write(state)
    watcher.refresh()
    assert watcher.current.production.version == first  # refused: the serving model stays


class Broken:
    name, version, horizon = "broken", 1, 12

    def init_state(self) -> dict:
        return {}

    def step(self, items):
        raise RuntimeError("boom")


def test_a_failing_model_falls_back_to_the_baseline_per_sensor() -> None:
    import orjson

    models = ModelSet(SeasonalNaive(horizon=12, season=24), production=Broken())
    processor = BatchProcessor(lambda: models, Limits(), 3600, lambda _: None, clock=lambda: 1.8e9)
    records = [
        RawRecord(
            "readings", 0, i, b"s", orjson.dumps({"sensor_id": "s", "ts": 1e9 + 60 * i, "value": i})
        )
        for i in range(3)
    ]
    result = processor.process(records)
    assert [p.model for p in result.predictions] == ["baseline", "baseline"]
    assert result.fallbacks == {"failed": 2}


def test_series_times_are_epoch_seconds() -> None:
    series = load_wide_csv(ETTH1)
    assert series.ts[0] == 1467331200.0  # 2016-07-01T00:00:00Z
    assert series.step_seconds == 3600.0


def test_shadow_and_production_of_one_name_keep_separate_state(trained, tmp_path: Path) -> None:
    import orjson

    registry = Registry(tmp_path)
    first, second = register(registry, trained), register(registry, trained)
    models = ModelSet(
        SeasonalNaive(horizon=12, season=24),
        registry.load("lstm", first),
        registry.load("lstm", second),
    )
    processor = BatchProcessor(lambda: models, Limits(), 3600, lambda _: None, clock=lambda: 2e9)
    records = [
        RawRecord(
            "readings",
            0,
            i,
            b"s",
            orjson.dumps({"sensor_id": "s", "ts": 1e9 + 3600 * i, "value": 10 + i % 24}),
        )
        for i in range(60)
    ]
    result = processor.process(records)
    served = [p for p in result.predictions if p.model == "lstm"]
    assert len(served) == len(result.shadow) == 60 - CONFIG.lookback + 1
    # Same weights, separate state: the shadow's forecasts equal production's.
    for mine, theirs in zip(served, result.shadow, strict=True):
        assert (theirs.model_version, theirs.seq) == (second, mine.seq)
        assert np.allclose(mine.yhat, theirs.yhat, atol=1e-6)

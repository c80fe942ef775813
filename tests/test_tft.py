"""The TFT: direct-tensor inference equals model.predict and the offline path, cadence,
late corrections, the registry and the variable importances."""

from __future__ import annotations

import numpy as np
import pytest

from models.base import NOT_DUE
from models.registry import Registry
from models.tft import (
    QUIET,
    WARM_UP,
    _quiet,
    dataset,
    forward,
    long_frame,
    offline_windows,
)
from streams.state import SensorState
from tests.conftest import base_env, run_cli


@pytest.fixture(scope="module")
def fitted(tiny_tft):
    return tiny_tft


@pytest.fixture(scope="module")
def registry(fitted, tmp_path_factory) -> Registry:
    registry = Registry(tmp_path_factory.mktemp("data") / "models")
    registry.register("tft", fitted.artifact, fitted.meta)
    return registry


def test_direct_tensors_give_what_model_predict_gives(fitted) -> None:
    values, ts = fitted.split.test
    channels = [f"c{i}" for i in range(values.shape[1])]
    frame = long_frame(values, ts, channels)
    with _quiet():
        library = fitted.result.net.predict(
            dataset(frame, fitted.config),
            mode="quantiles",
            trainer_kwargs={"accelerator": "cpu", **QUIET},  # a fresh dict: predict mutates it
        ).numpy()
    direct = []
    for c in range(values.shape[1]):
        encoder, future, _ = offline_windows(
            values[:, c], ts, fitted.config.lookback, fitted.config.horizon
        )
        direct.append(forward(fitted.result.net, encoder, future))
    direct = np.concatenate(direct)
    assert direct.shape == library.shape
    assert np.allclose(direct, library, atol=1e-5), np.abs(direct - library).max()


def test_streaming_gives_the_offline_forecasts(fitted, registry) -> None:
    forecaster = registry.load("tft", 1)
    values, ts = fitted.split.test
    encoder, future, _ = offline_windows(
        values[:, 0], ts, fitted.config.lookback, fitted.config.horizon
    )
    offline = forward(fitted.result.net, encoder, future)[..., 1]
    state = forecaster.init_state()
    streamed = []
    for start in range(0, len(values), 13):  # uneven micro-batches
        stop = min(start + 13, len(values))
        items = [(state, float(values[t, 0]), float(ts[t])) for t in range(start, stop)]
        streamed += [out[0] for out in forecaster.step(items) if out is not None]
        state = SensorState.from_bytes(SensorState(models={"m": state}).to_bytes()).models["m"]
    assert len(streamed) == len(values) - WARM_UP - fitted.config.lookback + 1
    got = np.array(streamed[: len(offline)])
    assert np.allclose(got, offline, atol=1e-5), np.abs(got - offline).max()


def test_a_cadence_forecasts_every_k_readings(fitted, registry) -> None:
    forecaster = registry.load("tft", 1)
    forecaster.cadence = 4
    state = forecaster.init_state()
    values, ts = fitted.split.test
    readings = zip(values[:80, 1], ts[:80], strict=True)
    out = forecaster.step([(state, float(v), float(t)) for v, t in readings])
    first = WARM_UP + fitted.config.lookback - 1
    assert all(o is None for o in out[:first])
    due = [i for i, o in enumerate(out) if isinstance(o, tuple)]
    assert due == list(range(first, 80, 4))
    assert all(out[i] is NOT_DUE for i in range(first, 80) if i not in due)


def test_quantiles_become_ordered_intervals_and_coverage_is_reported(fitted) -> None:
    test = fitted.meta["metrics"]["test"]
    assert 0.5 < test["coverage"] <= 1.0
    assert test["mse"] < 1.5  # scaled errors: far better than noise on ETTh1
    forecaster_out = forward(
        fitted.result.net,
        *offline_windows(fitted.split.test[0][:, 2], fitted.split.test[1], 24, 6)[:2],
    )
    assert forecaster_out.shape[-1] == 3


def test_variable_importances_are_stored_and_shown(registry) -> None:
    meta = registry.meta("tft", 1)
    encoder, decoder = meta["importances"]["encoder"], meta["importances"]["decoder"]
    assert set(encoder) == {"value", "level_z", "ewm_gap", "season_z", *decoder}
    assert abs(sum(encoder.values()) - 1) < 1e-3 and abs(sum(decoder.values()) - 1) < 1e-3
    shown = run_cli("models", "importances", "tft", "1", env=base_env(registry.root.parent))
    assert shown.returncode == 0, shown.stderr
    assert "encoder:" in shown.stdout and "value" in shown.stdout


def test_a_late_reading_corrects_the_feature_windows(fitted, registry) -> None:
    forecaster = registry.load("tft", 1)
    values, ts = fitted.split.test
    readings = [(float(v), float(t)) for v, t in zip(values[:40, 3], ts[:40], strict=True)]
    in_time, late = forecaster.init_state(), forecaster.init_state()
    forecaster.step([(in_time, v, t) for v, t in readings])
    forecaster.step([(late, v, t) for v, t in readings[:37] + readings[38:]])
    forecaster.correct(late, readings[37][0], 2, False)
    assert list(late["features"].recent) == list(in_time["features"].recent)
    a = forecaster.features.update(in_time["features"], 1.0, ts[40])
    b = forecaster.features.update(late["features"], 1.0, ts[40])
    windows = [i for i, n in enumerate(forecaster.features.names) if not n.startswith("ewm")]
    assert np.allclose(np.array(a)[windows], np.array(b)[windows])


def test_training_is_deterministic_with_a_seed(fitted, short_csv) -> None:
    from models.data import load_wide_csv
    from models.fit import fit

    again = fit("tft", load_wide_csv(short_csv), fitted.config)
    for name, tensor in fitted.result.net.state_dict().items():
        assert np.array_equal(tensor.numpy(), again.result.net.state_dict()[name].numpy()), name
    assert again.meta["metrics"] == fitted.meta["metrics"]


def test_forward_in_chunks_equals_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from models import tft

    config = tft.TFTConfig(horizon=6, lookback=24, cadence=6)
    net = tft.build_network(config).eval()
    rng = np.random.default_rng(0)
    encoder = rng.normal(size=(20, config.lookback, 8)).astype(np.float32)
    future = 1.6e9 + 3600 * (np.arange(20)[:, None] + np.arange(1, 7))
    whole = tft.forward(net, encoder, future)
    monkeypatch.setattr(tft, "FORWARD_CHUNK", 7)  # 7 + 7 + 6 windows
    np.testing.assert_allclose(tft.forward(net, encoder, future), whole, rtol=1e-5, atol=1e-6)

"""Online features equal the same features computed in batch with pandas, at every step."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.data import load_wide_csv
from models.features import FeatureSpec, OnlineFeatures, batch_features
from tests.conftest import ETTH1

SPEC = FeatureSpec(lags=(1, 3, 24), diffs=(1, 24), windows=(4, 24), ewm_alphas=(0.1, 0.5))


def stream(features: OnlineFeatures, values, ts, restart_every: int | None = None) -> np.ndarray:
    state = features.init_state()
    rows = []
    for i, (value, t) in enumerate(zip(values, ts, strict=True)):
        if restart_every and i % restart_every == 0:  # through JSON, as after a crash
            state = features.restore(orjson.loads(orjson.dumps(state.to_json())))
        rows.append(features.update(state, float(value), float(t)))
    return np.array(rows)


def assert_same(online: np.ndarray, batch: pd.DataFrame) -> None:
    expected = batch.to_numpy()
    assert online.shape == expected.shape
    nan = np.isnan(expected)
    assert (np.isnan(online) == nan).all(), "defined at different steps"
    worst = np.abs(online[~nan] - expected[~nan]) / np.maximum(1.0, np.abs(expected[~nan]))
    # pandas' rolling std also adds and removes values; the worst difference seen is its
    # rounding (1e-7 over ETTh1's flat stretches, where the exact answer is 0).
    assert worst.max() < 1e-6, worst.max()


def test_every_feature_matches_pandas_at_every_step_on_etth1() -> None:
    series = load_wide_csv(ETTH1)
    values, ts = series.values[:2000, 0], series.ts[:2000]
    online = OnlineFeatures(SPEC)
    assert_same(stream(online, values, ts), batch_features(values, ts, SPEC))


def test_state_restored_from_json_continues_exactly() -> None:
    series = load_wide_csv(ETTH1)
    values, ts = series.values[:600, 2], series.ts[:600]
    online = OnlineFeatures(SPEC)
    assert_same(stream(online, values, ts, restart_every=37), batch_features(values, ts, SPEC))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=80,
    )
)
def test_any_series_matches_pandas(values: list[float]) -> None:
    ts = 1.7e9 + 60.0 * np.arange(len(values))
    online = stream(OnlineFeatures(SPEC), values, ts)
    expected = batch_features(np.array(values), ts, SPEC).to_numpy()
    nan = np.isnan(expected)
    assert (np.isnan(online) == nan).all()
    # Rolling sums lose precision on wild series; scale the tolerance by the magnitudes.
    scale = max(1.0, max(abs(v) for v in values))
    assert np.allclose(online[~nan], expected[~nan], rtol=1e-7, atol=1e-9 * scale * scale)


def test_covariates_are_carried_forward() -> None:
    spec = FeatureSpec(lags=(1,), diffs=(1,), windows=(2,), ewm_alphas=(0.5,), covariates=("t",))
    online = OnlineFeatures(spec)
    state = online.init_state()
    given_covariates = [{}, {"t": 20.5}, {}, {"t": 21.0}]
    rows = [online.update(state, 1.0, 1.7e9 + i, c) for i, c in enumerate(given_covariates)]
    column = [row[spec.names.index("t")] for row in rows]
    assert math.isnan(column[0]) and column[1:] == [20.5, 20.5, 21.0]
    frame = pd.DataFrame({"t": [math.nan, 20.5, math.nan, 21.0]})
    batch = batch_features(np.ones(4), 1.7e9 + np.arange(4), spec, frame)
    assert batch["t"].iloc[1:].tolist() == [20.5, 20.5, 21.0]


def test_a_bad_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="windows"):
        FeatureSpec(windows=(1,))
    with pytest.raises(ValueError, match="alphas"):
        FeatureSpec(ewm_alphas=(1.5,))

"""A trained model serving the live stream: same forecasts as offline, shadow, hot swap."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from models.data import load_wide_csv
from models.registry import Registry
from tests.conftest import ETTH1, System, base_env, run_cli, start_system, wait_for_model

pytestmark = pytest.mark.integration

LOOKBACK, HORIZON = 48, 24
TRAIN = [
    "train",
    "--data",
    str(ETTH1),
    "--lookback",
    str(LOOKBACK),
    "--horizon",
    str(HORIZON),
    "--hidden",
    "8",
    "--epochs",
    "1",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    data_dir = tmp_path_factory.mktemp("served")
    trained = run_cli(*TRAIN, "--promote", "production", env=base_env(data_dir), timeout=120)
    assert trained.returncode == 0, trained.stderr
    running = start_system(data_dir)
    yield running
    assert running.stop() == 0


def query(system: System, sql: str) -> list[dict]:
    result = system.cli("query", sql, "--format", "json", "--max-rows", "100000")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(system: System, sql: str, expected: object, within: float = 60) -> list[dict]:
    deadline = time.monotonic() + within
    while True:
        rows = query(system, sql)
        if rows == expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_live_forecasts_equal_the_offline_evaluation(served: System) -> None:
    rows = 120
    assert served.cli("replay", str(ETTH1), "--limit", str(rows)).returncode == 0
    counted = (
        "SELECT count() AS n FROM forecast.prediction_steps "
        "WHERE sensor_id = 'ETTh1.OT' AND horizon = 1"
    )
    assert wait_for(served, counted, [{"n": rows - 1}]) == [{"n": rows - 1}]
    by_model = query(
        served,
        "SELECT model, min(seq) AS first, max(seq) AS last "
        "FROM forecast.prediction_steps WHERE sensor_id = 'ETTh1.OT' GROUP BY model "
        "ORDER BY first",
    )
    # The baseline serves while the LSTM's window fills, then the LSTM takes over.
    assert by_model == [
        {"model": "baseline", "first": 1, "last": LOOKBACK - 2},
        {"model": "lstm", "first": LOOKBACK - 1, "last": rows - 1},
    ]

    live = query(
        served,
        "SELECT ts, horizon, yhat FROM forecast.prediction_steps "
        "WHERE sensor_id = 'ETTh1.OT' AND model = 'lstm' ORDER BY ts, horizon",
    )
    live_yhat = np.array([r["yhat"] for r in live]).reshape(-1, HORIZON)

    registry = Registry(served.data_dir / "models")
    net = registry.load("lstm", 1).net
    series = load_wide_csv(ETTH1)
    ot = series.columns.index("OT")
    values, ts = series.values[:rows, ot : ot + 1], series.ts[:rows]
    with torch.inference_mode():
        offline, _, _ = net.segment(torch.as_tensor(values.T, dtype=torch.float32), ts)
    offline = offline[0].numpy()
    assert live_yhat.shape == offline.shape
    np.testing.assert_allclose(live_yhat, offline, rtol=1e-4, atol=1e-3)

    # Scored against the actuals, the stream and the offline path agree within 1%.
    actual = series.values[:, ot]
    errors_live, errors_offline = [], []
    for i in range(len(offline)):
        t = LOOKBACK - 1 + i
        steps = min(HORIZON, rows - 1 - t)
        errors_live += list(live_yhat[i, :steps] - actual[t + 1 : t + 1 + steps])
        errors_offline += list(offline[i, :steps] - actual[t + 1 : t + 1 + steps])
    mse_live, mse_offline = np.mean(np.square(errors_live)), np.mean(np.square(errors_offline))
    assert abs(mse_live - mse_offline) <= 0.01 * mse_offline
    from_view = query(
        served,
        "SELECT avg(error * error) AS mse FROM forecast.forecast_errors "
        "WHERE sensor_id = 'ETTh1.OT' AND model = 'lstm'",
    )[0]["mse"]
    assert abs(from_view - mse_live) <= 0.01 * mse_live


def test_shadow_then_hot_swap_without_losing_or_repeating_a_prediction(served: System) -> None:
    trained = served.cli(*TRAIN, "--seed", "7")
    assert "registered lstm v2" in trained.stdout, trained.stderr
    assert served.cli("models", "promote", "lstm", "2", "--stage", "shadow").returncode == 0
    wait_for_model(served, 2, "shadow")
    assert served.cli("replay", str(ETTH1), "--start", "120", "--limit", "30").returncode == 0
    shadow_sql = (
        "SELECT min(seq) AS first, max(seq) AS last FROM forecast.prediction_steps "
        "WHERE sensor_id = 'ETTh1.OT' AND model_version = 2 AND horizon = 1"
    )
    # v2 starts afresh and fills its own window, so it forecasts once it has LOOKBACK values
    # of its own; these 30 readings are too few, so it has not forecast yet.
    assert query(served, shadow_sql) == [{"first": 0, "last": 0}]

    assert served.cli("models", "promote", "lstm", "2").returncode == 0
    wait_for_model(served, 2, "production")
    assert served.cli("replay", str(ETTH1), "--start", "150", "--limit", "60").returncode == 0
    last = 209  # readings 2..210 of OT, one prediction each
    top = "SELECT max(seq) AS top FROM forecast.prediction_steps WHERE sensor_id = 'ETTh1.OT'"
    assert wait_for(served, top, [{"top": last}]) == [{"top": last}]
    published = query(
        served,
        "SELECT seq, model, model_version FROM forecast.prediction_steps "
        "WHERE sensor_id = 'ETTh1.OT' AND horizon = 1 ORDER BY seq, model_version",
    )
    by_seq: dict[int, list] = {}
    for row in published:
        by_seq.setdefault(row["seq"], []).append((row["model"], row["model_version"]))
    assert sorted(by_seq) == list(range(1, last + 1))  # no gap, nothing repeated
    # After the swap, v2 serves once its window is full; the baseline bridges until then.
    assert by_seq[last] == [("lstm", 2)]
    assert ("lstm", 1) in by_seq[149] and ("lstm", 1) not in by_seq[last]

"""Training on the user's own data: every row used, a configurable split, targets and
covariates, the step and season from the times (gaps are not steps), early stopping and
its warnings, the warm-up warning at promotion, and the ETT protocol kept on request."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from forecast.cli import main
from forecast.errors import ConfigError
from models.data import (
    SplitPlan,
    detect_step,
    fraction_split,
    load_wide_csv,
    parse_fractions,
    protocol_split,
    timing,
)
from models.evaluation import seasonal_naive
from models.features import FeatureSpec, OnlineFeatures, batch_features
from models.fit import TRAIN_DEFAULTS, configure, fit, prepare
from models.registry import Registry, step_and_season, warm_up
from models.tft import FEATURES, feature_spec, forward, offline_windows
from models.train import TrainConfig, offline_forecasts, train_lstm
from streams.state import SensorState
from tests.conftest import ETTH1, ROOT

BANK_CALLS = ROOT.parent / "shared" / "data" / "bank_calls" / "bank_calls.csv"
START = 1_700_006_400.0  # 2023-11-15T00:00:00Z, a Wednesday
TINY = {"lookback": 24, "horizon": 6, "hidden": 4, "epochs": 1, "chunk": 64}


def write_csv(path: Path, ts: np.ndarray, **columns: object) -> Path:
    frame = pd.DataFrame({"time": pd.to_datetime(ts, unit="s", utc=True), **columns})
    frame["time"] = frame["time"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    frame.to_csv(path, index=False)
    return path


def daily(ts: np.ndarray, seed: int = 0) -> np.ndarray:
    """A daily cycle with noise."""
    rng = np.random.default_rng(seed)
    return 10 + 3 * np.sin(ts / 86_400 * 2 * np.pi) + rng.normal(0, 0.3, len(ts))


def business_hours(days: int, step: float = 300.0) -> np.ndarray:
    """Times from 07:00 to 21:00 inclusive on weekdays: a gap every night and weekend."""
    out = []
    for day in range(days):
        start = START + day * 86_400
        if pd.Timestamp(start, unit="s").dayofweek < 5:
            out.append(start + 7 * 3600 + np.arange(0, 14 * 3600 + 1, step))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def half_hourly(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ts = START + 1800.0 * np.arange(960)  # 20 days
    return write_csv(
        tmp_path_factory.mktemp("half") / "half.csv",
        ts,
        a=daily(ts, 1),
        b=daily(ts, 2) * 5,
        site=["north"] * len(ts),
    )


@pytest.fixture(scope="module")
def sleepy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five-minute readings in business hours only (169 a weekday)."""
    ts = business_hours(21)
    return write_csv(tmp_path_factory.mktemp("sleepy") / "sleepy.csv", ts, calls=daily(ts, 3))


def cli(*args: str, data_dir: Path):
    result = CliRunner().invoke(main, list(args), env={"FORECAST_DATA_DIR": str(data_dir)})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# -- step and season ---------------------------------------------------------------------


def test_the_step_is_the_most_common_spacing_and_gaps_are_not_steps() -> None:
    bank = timing(load_wide_csv(BANK_CALLS).ts)
    assert (bank.step_seconds, bank.season, bank.day_steps) == (300.0, 169, 288)
    assert bank.gaps > 100  # every night and every weekend
    assert bank.longest_gap >= 2 * 86_400
    assert "season 169 readings" in bank.describe() and "step 5 min" in bank.describe()

    hourly = timing(load_wide_csv(ETTH1).ts)
    assert (hourly.step_seconds, hourly.season, hourly.gaps) == (3600.0, 24, 0)

    half = timing(START + 1800.0 * np.arange(500))
    assert (half.step_seconds, half.season) == (1800.0, 48)

    # A few readings lost here and there: still 288 five-minute steps a day.
    rng = np.random.default_rng(0)
    ts = START + 300.0 * np.arange(288 * 10)
    lossy = timing(np.sort(rng.choice(ts, size=int(len(ts) * 0.97), replace=False)))
    assert (lossy.step_seconds, lossy.season) == (300.0, 288)
    assert lossy.gaps > 0

    assert timing(START + 86_400.0 * np.arange(100)).season == 7  # daily: a week
    assert timing(bank_ts := load_wide_csv(BANK_CALLS).ts, season=338).season == 338
    assert timing(bank_ts, season=338).as_dict()["season_source"] == "given"
    assert detect_step(np.array([0.0, 10.0, 20.0, 30.0, 1000.0])) == 10.0


def test_the_season_of_a_business_hours_sensor_is_its_readings_per_day(sleepy: Path) -> None:
    series = load_wide_csv(sleepy)
    found = timing(series.ts)
    assert (found.step_seconds, found.season) == (300.0, 169)
    assert found.longest_gap == pytest.approx(
        2 * 86_400 + 10 * 3600
    )  # Friday 21:00 to Monday 07:00


def test_seasonal_features_keep_the_hourly_names_and_match_pandas() -> None:
    assert FeatureSpec.for_season(24) == FeatureSpec()
    assert feature_spec(24) == FEATURES
    assert FEATURES.names[:3] == ["diff_24", "mean_24", "std_24"]
    spec = feature_spec(48)
    assert spec.names[:3] == ["diff_48", "mean_48", "std_48"] and spec.memory == 48
    ts = START + 1800.0 * np.arange(300)
    values = daily(ts)
    online = OnlineFeatures(spec)
    state = online.init_state()
    rows = np.array(
        [online.update(state, float(v), float(t)) for v, t in zip(values, ts, strict=True)]
    )
    expected = batch_features(values, ts, spec).to_numpy()
    assert np.allclose(rows, expected, equal_nan=True, atol=1e-7)


# -- splits ------------------------------------------------------------------------------


def test_the_fraction_split_uses_every_row_and_tests_on_the_latest(half_hourly: Path) -> None:
    series = load_wide_csv(half_hourly)
    total, lookback, horizon = len(series.values), 48, 6
    split = fraction_split(series, lookback, (0.7, 0.1, 0.2), horizon)
    assert split.rows == (672, 96, 192) and sum(split.rows) == total and split.unused == 0
    windows = split.origins(horizon)
    assert sum(windows) == total - lookback - 3 * (horizon - 1)
    assert split.test[1][-1] == series.ts[-1]  # the latest rows are the test part's
    assert split.valid[1][lookback] == series.ts[672]
    assert split.test[1][lookback] == series.ts[672 + 96]
    assert len(split.valid[0]) == 96 + lookback and len(split.test[0]) == 192 + lookback
    # Scaled on the training rows only.
    assert np.allclose(split.train[0].mean(0), 0) and np.allclose(split.train[0].std(0), 1)
    # The model's own offline path makes exactly that many forecasts per part.
    ridge = train_lstm(split, TrainConfig(lookback=lookback, horizon=horizon, hidden=4, epochs=0))
    made = [offline_forecasts(ridge.net, *part)[0].shape[1] for part in split_parts(split)]
    assert tuple(made) == windows


def split_parts(split):
    return split.train, split.valid, split.test


def test_the_ett_protocol_gives_the_old_split() -> None:
    series = load_wide_csv(ETTH1)
    split = SplitPlan("ett").apply(series, 336, 96)
    assert split.rows == (8640, 2880, 2880) and split.unused == len(series.values) - 14_400
    old = protocol_split(series, 336)
    for new, before in zip(split_parts(split), split_parts(old), strict=True):
        assert np.array_equal(new[0], before[0]) and np.array_equal(new[1], before[1])
    mean = series.values[:8640].mean(0)
    assert np.allclose(split.mean, mean)
    assert np.array_equal(split.test[1], series.ts[8640 + 2880 - 336 : 14_400])
    short = protocol_split(load_wide_csv(ETTH1), 48)  # the whole file is long enough
    assert short.rows == (8640, 2880, 2880)


def test_a_short_file_under_the_ett_protocol_is_cut_60_20_20(half_hourly: Path) -> None:
    assert SplitPlan("ett").apply(load_wide_csv(half_hourly), 48, 6).rows == (576, 192, 192)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0.7,0.3", "three fractions"),
        ("a,b,c", "three fractions"),
        ("0.8,0.2,0", "above 0"),
        ("0.7,0.2,0.2", "sum to 1"),
        ("70,10,20", "sum to 1"),
    ],
)
def test_a_bad_split_is_refused(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_fractions(text)


def test_too_few_rows_for_the_split_say_what_they_need(half_hourly: Path) -> None:
    series = load_wide_csv(half_hourly)
    with pytest.raises(ConfigError, match=r"too few.*validation and test 200 or more"):
        fraction_split(series, 48, (0.7, 0.1, 0.2), 200)


# -- targets and covariates --------------------------------------------------------------


def test_targets_default_to_every_numeric_column(half_hourly: Path) -> None:
    series = load_wide_csv(half_hourly)
    assert series.columns == ["a", "b"] and series.skipped == ("site",)
    only = load_wide_csv(half_hourly, targets=["b"])
    assert only.columns == ["b"] and np.array_equal(only.values[:, 0], series.values[:, 1])
    with_cov = load_wide_csv(half_hourly, covariates=["b"])
    assert with_cov.columns == ["a"] and with_cov.covariate_columns == ("b",)
    assert with_cov.covariates.shape == (len(series.values), 1)


@pytest.mark.parametrize(
    ("targets", "covariates", "message"),
    [
        (["nope"], None, r"no target column 'nope'; the columns are: a, b \(not numeric: site\)"),
        (["time"], None, r"'time' is the time column"),
        (["site"], None, r"target column 'site' is not numeric \(it holds 'north'\)"),
        (None, ["x"], "no covariate column 'x'"),
        (["a"], ["a"], "a: a column is a target or a covariate, not both"),
        (["a", "a"], None, "named twice"),
    ],
)
def test_unknown_or_unusable_columns_are_refused_with_the_choices(
    half_hourly: Path, targets, covariates, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_wide_csv(half_hourly, targets, covariates)


def test_a_model_that_cannot_use_covariates_says_so(half_hourly: Path) -> None:
    series = load_wide_csv(half_hourly, targets=["a"], covariates=["b"])
    for kind in ("lstm", "tft"):
        with pytest.raises(ConfigError, match=f"{kind} does not use covariates yet"):
            prepare(kind, series, configure(kind, lookback=24, horizon=6))


def test_times_are_read_and_must_increase(tmp_path: Path) -> None:
    ts = START + 3600.0 * np.array([0, 1, 2, 2, 3])
    path = write_csv(tmp_path / "dup.csv", ts, x=np.arange(5.0))
    with pytest.raises(ConfigError, match="times must increase, but line 5"):
        load_wide_csv(path)
    epoch = tmp_path / "epoch.csv"
    epoch.write_text("ts,x\n1700006400,1\n1700006700,2\n1700007000,3\n")
    assert load_wide_csv(epoch).ts.tolist() == [1700006400.0, 1700006700.0, 1700007000.0]
    bad = tmp_path / "nan.csv"
    bad.write_text("time,x\n2024-01-01T00:00:00Z,1\n2024-01-01T01:00:00Z,\n")
    with pytest.raises(ConfigError, match=r"missing or non-finite values in x \(1\)"):
        load_wide_csv(bad)


# -- training ----------------------------------------------------------------------------


def test_training_uses_the_season_and_scores_per_target_and_against_seasonal_naive(
    half_hourly: Path,
) -> None:
    series = load_wide_csv(half_hourly)
    config = configure("lstm", lookback=48, horizon=6, hidden=4, epochs=1, chunk=64)
    fitted = fit("lstm", series, config, plan=SplitPlan())
    meta = fitted.meta
    assert meta["data"]["rows"] == meta["data"]["file_rows"] == len(series.values)
    assert (meta["data"]["step_seconds"], meta["data"]["season"]) == (1800.0, 48)
    assert meta["split"]["rows"] == {"train": 672, "valid": 96, "test": 192}
    assert meta["split"]["windows"] == {"train": 619, "valid": 91, "test": 187}
    assert set(meta["metrics_by_target"]["test"]) == {"a", "b"}
    per_target = [m["mse"] for m in meta["metrics_by_target"]["test"].values()]
    assert np.mean(per_target) == pytest.approx(meta["metrics"]["test"]["mse"], rel=1e-5)
    # The seasonal naive on the test origins is the reference evaluation's, one day back.
    baseline = meta["baseline"]
    mse, mae = seasonal_naive(fitted.split.test[0], 48, 6, 48)
    assert baseline["season"] == 48
    assert baseline["test"]["mse"] == pytest.approx(mse, abs=1e-6)
    assert baseline["test"]["mae"] == pytest.approx(mae, abs=1e-6)
    assert 0 <= baseline["steps_beaten"] <= baseline["steps"] == 6
    assert step_and_season(meta) == (1800.0, 48) and warm_up(meta) == 48


def test_a_business_hours_slice_of_bank_calls_trains_on_all_rows_and_beats_naive(
    tmp_path: Path,
) -> None:
    lines = BANK_CALLS.read_text().splitlines()[:2536]  # 15 business days
    path = tmp_path / "bank.csv"
    path.write_text("\n".join(lines) + "\n")
    series = load_wide_csv(path)
    config = configure("lstm", lookback=169, horizon=12, hidden=4, epochs=1, chunk=128)
    fitted = fit("lstm", series, config, plan=SplitPlan())
    meta = fitted.meta
    assert meta["data"]["rows"] == 2535 and meta["data"]["season"] == 169
    assert meta["data"]["timing"]["gaps"] > 10
    assert meta["baseline"]["season"] == 169
    assert meta["metrics"]["test"]["mse"] < meta["baseline"]["test"]["mse"]
    assert meta["baseline"]["steps_beaten"] == 12


def test_early_stopping_keeps_the_best_epoch(tmp_path: Path) -> None:
    ts = START + 3600.0 * np.arange(800)
    noise = np.random.default_rng(5).normal(0, 1, len(ts))
    series = load_wide_csv(write_csv(tmp_path / "noise.csv", ts, x=noise))
    config = configure("lstm", lookback=24, horizon=6, hidden=8, epochs=40, patience=2, lr=0.05)
    fitted = fit("lstm", series, config, plan=SplitPlan())
    result = fitted.result
    assert result.stopped_early and fitted.meta["stopped_early"]
    last = result.history[-1]["epoch"]
    assert last < 40 and last == result.best_epoch + 2
    best = min(row["valid_mse"] for row in result.history)
    assert result.valid.mse == pytest.approx(best, abs=1e-6)  # the best weights came back


def test_train_cli_end_to_end_on_half_hourly_data(half_hourly: Path, tmp_path: Path) -> None:
    result = cli(
        "train",
        "--data",
        str(half_hourly),
        "--target",
        "b",
        "--lookback",
        "96",
        "--horizon",
        "6",
        "--hidden",
        "4",
        "--epochs",
        "2",
        "--split",
        "0.6,0.2,0.2",
        "--promote",
        "production",
        "--result",
        str(tmp_path / "out.json"),
        data_dir=tmp_path,
    )
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "960 rows x 1 target (b)" in err
    assert "step 30 min (the most common spacing); season 48 readings" in err
    assert "not numeric, left out: site" in err
    assert "train 576, validation 192, test 192 rows" in err
    assert "validation" in err and "epoch 2/2" in err  # the progress line
    out = result.stdout
    assert "trained in" in out and "test by target:\n  b  " in out
    assert "seasonal naive (season 48), test:" in out and "registered lstm v1" in out
    # The lookback (96) is longer than a season (48): the fallback serves until then.
    assert "warning: lstm v1 forecasts a sensor only once it has 96 readings (2 days" in err
    meta = Registry(tmp_path / "models").meta("lstm", 1)
    assert meta["data"]["targets"] == ["b"] and meta["data"]["season"] == 48
    assert meta["split"]["fractions"] == [0.6, 0.2, 0.2] and meta["warm_up"] == 96
    outcome = orjson.loads((tmp_path / "out.json").read_bytes())
    assert (outcome["rows"], outcome["step_seconds"], outcome["season"]) == (960, 1800.0, 48)

    promoted = cli("models", "promote", "lstm", "1", "--stage", "shadow", data_dir=tmp_path)
    assert promoted.exit_code == 0, promoted.output
    assert "lstm v1 is now shadow" in promoted.stdout
    assert "forecasts a sensor only once it has 96 readings" in promoted.stderr
    assert "the shadow publishes nothing for it" in promoted.stderr


def test_train_cli_warns_when_the_last_epoch_was_the_best(tmp_path: Path) -> None:
    ts = START + 3600.0 * np.arange(700)
    hour, weekend = ts % 86_400 / 86_400 * 2 * np.pi, (ts // 86_400 + 3) % 7 >= 5
    # Weekends differ: the ridge start cannot see it, the LSTM (fed the calendar) learns
    # it a little more every epoch.
    wave = np.sin(hour) + 2 * weekend * np.sin(2 * hour)
    rng = np.random.default_rng(1)
    path = write_csv(tmp_path / "wave.csv", ts, x=wave + rng.normal(0, 0.05, len(ts)))
    result = cli(
        "train",
        "--data",
        str(path),
        "--lookback",
        "24",
        "--horizon",
        "6",
        "--hidden",
        "8",
        "--epochs",
        "2",
        "--season",
        "24",
        data_dir=tmp_path,
    )
    assert result.exit_code == 0, result.output
    assert "best epoch 2 of 2 (at most 2)" in result.stdout
    assert "warning: the best epoch was the last (2 of at most 2)" in result.stderr
    assert "--epochs 4" in result.stderr
    assert "season 24 readings (--season)" in result.stderr
    assert "warning: lstm" not in result.stderr  # lookback 24: no longer than a season


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "nope"], "no target column 'nope'; the columns are: a, b"),
        (["--covariates", "b"], "lstm does not use covariates yet"),
        (["--lookback", "900"], "rows are too few"),
    ],
)
def test_train_cli_errors_are_one_line(half_hourly: Path, tmp_path: Path, args, message) -> None:
    result = cli("train", "--data", str(half_hourly), *args, data_dir=tmp_path)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split", "0.5,0.5"], "Invalid value for '--split': expected three fractions"),
        (["--split", "0.7,0.1,0.1"], "must sum to 1"),
        (["--protocol", "ett", "--split", "0.7,0.1,0.2"], "--split applies to --protocol"),
        (["--season", "1"], "Invalid value for '--season'"),
    ],
)
def test_train_cli_refuses_bad_flags(half_hourly: Path, tmp_path: Path, args, message) -> None:
    result = cli("train", "--data", str(half_hourly), *args, data_dir=tmp_path)
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_train_cli_help_names_its_defaults(tmp_path: Path) -> None:
    text = cli("train", "--help", data_dir=tmp_path).stdout
    lstm, tft = TRAIN_DEFAULTS["lstm"], TRAIN_DEFAULTS["tft"]
    assert f"lstm {lstm['epochs']}, tft {tft['epochs']}" in text
    assert f"lstm {lstm['patience']}, tft {tft['patience']}" in text
    for flag in ("--split", "--protocol", "--target", "--covariates", "--season"):
        assert flag in text


def test_the_ett_protocol_flag_trains_on_the_published_rows(tmp_path: Path) -> None:
    result = cli(
        "train",
        "--data",
        str(ETTH1),
        "--protocol",
        "ett",
        "--target",
        "OT",
        "--lookback",
        "24",
        "--horizon",
        "6",
        "--hidden",
        "4",
        "--epochs",
        "0",
        data_dir=tmp_path,
    )
    assert result.exit_code == 0, result.output
    assert "train 8640, validation 2880, test 2880 rows" in result.stderr
    assert "leaves the last 3020 rows out" in result.stderr
    meta = Registry(tmp_path / "models").meta("lstm", 1)
    assert meta["data"]["rows"] == 14_400 and meta["data"]["file_rows"] == 17_420
    assert meta["split"]["protocol"] == "ett" and meta["split"]["unused"] == 3020


# -- the TFT's feature windows follow the season -----------------------------------------


def test_a_tft_on_five_minute_data_serves_what_it_evaluated(tmp_path: Path) -> None:
    ts = START + 300.0 * np.arange(560)
    path = write_csv(tmp_path / "five.csv", ts, x=daily(ts, 4))
    series = load_wide_csv(path)
    config = configure(
        "tft",
        lookback=12,
        horizon=4,
        hidden=4,
        heads=1,
        epochs=1,
        batches_per_epoch=3,
        batch_size=32,
    )
    fitted = fit("tft", series, config, plan=SplitPlan(), season=36)
    assert fitted.config.season == 36 and fitted.meta["params"]["season"] == 36
    assert fitted.split.context == 12 + 36 and fitted.meta["warm_up"] == 48
    assert fitted.meta["data"]["timing"]["season_source"] == "given"
    registry = Registry(tmp_path / "models")
    forecaster = registry.load("tft", registry.register("tft", fitted.artifact, fitted.meta))
    assert forecaster.features.spec == feature_spec(36)
    values, seg_ts = fitted.split.test
    encoder, future, _ = offline_windows(values[:, 0], seg_ts, 12, 4, 36)
    offline = forward(fitted.result.net, encoder, future)[..., 1]
    state, streamed = forecaster.init_state(), []
    for start in range(0, len(values), 17):
        stop = min(start + 17, len(values))
        items = [(state, float(values[t, 0]), float(seg_ts[t])) for t in range(start, stop)]
        streamed += [out[0] for out in forecaster.step(items) if out is not None]
        state = SensorState.from_bytes(SensorState(models={"m": state}).to_bytes()).models["m"]
    assert len(streamed) == len(values) - 36 - 12 + 1
    assert np.allclose(np.array(streamed[: len(offline)]), offline, atol=1e-5)
    assert torch.isfinite(torch.as_tensor(offline)).all()


def test_bench_accuracy_splits_finds_the_season_and_counts_the_steps_beaten(
    sleepy: Path, tmp_path: Path
) -> None:
    """On business hours, a split of every row: the naive's season is the 169 readings of
    a business day, and each model's row says at how many steps it beats that naive."""
    args = ["bench", "accuracy", "--dataset", str(sleepy), "--skip-tft", "--split", "0.6,0.2,0.2"]
    result = cli(*args, "--horizon", "6", "--lookback", "200", "--hidden", "4", "--epochs",
                 "1", data_dir=tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    lstm = next(line for line in result.output.splitlines() if line.startswith("lstm"))
    beaten, steps = lstm.split()[-1].split("/")
    assert steps == "6" and 0 <= int(beaten) <= 6
    assert "online baseline (seasonal naive, 169)" in result.output
    assert "--split 0.6,0.2,0.2 --season 169" in result.output

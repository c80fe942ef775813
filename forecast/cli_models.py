"""``forecast train``, ``forecast models ...`` and ``forecast bench accuracy``."""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import click
import orjson

from forecast.cli import _settings, command, main
from forecast.errors import ForecastError

PUBLISHED = [
    ("DLinear", 0.375, 0.399),
    ("PatchTST/64", 0.370, 0.400),
    ("FEDformer", 0.376, 0.419),
    ("Informer", 0.865, 0.713),
]


def _train_options(fn):
    options = [
        click.option("--horizon", type=click.IntRange(1, 1000), default=96, show_default=True),
        click.option("--lookback", type=click.IntRange(2, 5000), default=336, show_default=True),
        click.option("--hidden", type=click.IntRange(1, 1024), default=64, show_default=True),
        click.option("--epochs", type=click.IntRange(0, 1000), default=10, show_default=True),
        click.option(
            "--patience",
            type=click.IntRange(1, 100),
            default=3,
            show_default=True,
            help="Epochs without validation improvement before stopping.",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _fit(
    data: Path, horizon: int, lookback: int, hidden: int, epochs: int, patience: int, seed: int
):
    from models.data import load_wide_csv, protocol_split
    from models.train import TrainConfig, train_lstm

    series = load_wide_csv(data)
    split = protocol_split(series, lookback)
    config = TrainConfig(
        lookback=lookback,
        horizon=horizon,
        hidden=hidden,
        epochs=epochs,
        patience=patience,
        seed=seed,
    )
    click.echo(
        f"{series.name}: {len(series.values)} rows x {len(series.columns)} channels; "
        f"train/valid/test {len(split.train[0])}/{len(split.valid[0]) - lookback}/"
        f"{len(split.test[0]) - lookback}",
        err=True,
    )
    with click.progressbar(
        length=epochs + 1, label="training", file=sys.stderr, show_pos=True
    ) as bar:

        def progress(epoch: int, row: dict) -> None:
            bar.label = f"training (valid mse {row['valid_mse']:.4f})"
            bar.update(1)

        result = train_lstm(split, config, progress)
    return series, split, config, result


@command(main, "train")
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Wide CSV: a time column, then one column per channel.",
)
@click.option("--model", type=click.Choice(["lstm"]), default="lstm", show_default=True)
@_train_options
@click.option("--name", help="Registry name (default: the model kind).")
@click.option(
    "--promote",
    type=click.Choice(["production", "shadow"]),
    help="Put the new version in this stage at once.",
)
def train(
    data: Path,
    model: str,
    horizon: int,
    lookback: int,
    hidden: int,
    epochs: int,
    patience: int,
    seed: int,
    name: str | None,
    promote: str | None,
) -> None:
    """Train a model under the chronological protocol, evaluate it and register it."""
    from dataclasses import asdict

    import torch

    from models.registry import Registry

    settings = _settings()
    series, _split, config, result = _fit(data, horizon, lookback, hidden, epochs, patience, seed)
    registry = Registry(settings.models_dir)
    meta = {
        "kind": "linear-lstm",
        "params": asdict(config),
        "data": {
            "file": str(data),
            "sha256": series.fingerprint,
            "rows": len(series.values),
            "channels": series.columns,
            "step_seconds": series.step_seconds,
        },
        "metrics": {"valid": result.valid.as_dict(), "test": result.test.as_dict()},
        "best_epoch": result.best_epoch,
        "history": result.history,
        "train_seconds": round(result.seconds, 2),
    }
    artifact = {
        "kind": "linear-lstm",
        "config": asdict(config),
        "state_dict": result.net.state_dict(),
        "quantiles": torch.as_tensor(result.quantiles),
    }
    version = registry.register(name or model, artifact, meta)
    click.echo(
        f"best epoch {result.best_epoch} of {len(result.history) - 1}, {result.seconds:.1f}s"
    )
    click.echo(f"valid: {_metrics(result.valid.as_dict())}")
    click.echo(f"test:  {_metrics(result.test.as_dict())}")
    click.echo(f"registered {name or model} v{version}")
    if promote:
        registry.promote(name or model, version, promote)
        click.echo(f"promoted {name or model} v{version} to {promote}")


def _metrics(values: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in values.items())


@main.group()
def models() -> None:
    """List, inspect, promote and roll back registered models."""


def _registry():
    from models.registry import Registry

    return Registry(_settings().models_dir)


@command(models, "list")
def models_list() -> None:
    """Every registered version with its stage and test metrics."""
    rows = _registry().versions()
    if not rows:
        click.echo("no models registered; train one with `forecast train --data FILE`")
        return
    click.echo(
        f"{'name':<12}{'version':>8}  {'stage':<11}{'created':<21}"
        f"{'test mse':>9}{'test mae':>9}{'coverage':>9}"
    )
    for m in rows:
        test = m["metrics"]["test"]
        created = datetime.fromtimestamp(m["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"{m['name']:<12}{m['version']:>8}  {m['stage']:<11}{created:<21}"
            f"{test['mse']:>9.4f}{test['mae']:>9.4f}{test.get('coverage', 0):>9.3f}"
        )


@command(models, "show")
@click.argument("name")
@click.argument("version", type=int)
def models_show(name: str, version: int) -> None:
    """One version's parameters, metrics, data fingerprint and checksum (JSON)."""
    meta = _registry().meta(name, version)
    click.echo(orjson.dumps(meta, option=orjson.OPT_INDENT_2).decode())


@command(models, "promote")
@click.argument("name")
@click.argument("version", type=int)
@click.option(
    "--stage", type=click.Choice(["production", "shadow"]), default="production", show_default=True
)
def models_promote(name: str, version: int, stage: str) -> None:
    """Make a version serve (running workers switch within seconds)."""
    _registry().promote(name, version, stage)
    click.echo(f"{name} v{version} is now {stage}")


@command(models, "rollback")
@click.option(
    "--stage", type=click.Choice(["production", "shadow"]), default="production", show_default=True
)
def models_rollback(stage: str) -> None:
    """Return a stage to the version it had before."""
    ref = _registry().rollback(stage)
    click.echo(f"{stage} is back to {ref.name} v{ref.version}")


@main.group()
def bench() -> None:
    """Benchmarks (they report what they measured, on which machine)."""


@command(bench, "accuracy")
@click.option(
    "--dataset", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@_train_options
@click.option(
    "--season",
    type=click.IntRange(1, 10_000),
    default=24,
    show_default=True,
    help="Season of the online baseline, in steps.",
)
def bench_accuracy(
    dataset: Path,
    horizon: int,
    lookback: int,
    hidden: int,
    epochs: int,
    patience: int,
    seed: int,
    season: int,
) -> None:
    """Train and score our models under the published protocol; print the table."""
    import torch

    from models.evaluation import repeat_last, seasonal_naive
    from models.lstm import LinearLSTMNet
    from models.train import evaluate

    _settings()
    if lookback < season:
        raise ForecastError(f"--lookback {lookback} must cover a season ({season} steps)")
    series, split, _config, result = _fit(
        dataset, horizon, lookback, hidden, epochs, patience, seed
    )
    ridge_only = LinearLSTMNet(lookback, horizon, hidden)
    ridge_only.load_state_dict(result.net.state_dict())
    torch.nn.init.zeros_(ridge_only.head.weight)
    torch.nn.init.zeros_(ridge_only.head.bias)
    ridge_metrics = evaluate(ridge_only.eval(), split.test)
    test_values = split.test[0]
    rows = [
        (
            "lstm (ridge skip + LSTM residual)",
            result.test.mse,
            result.test.mae,
            result.test.coverage,
        ),
        ("  its linear path alone", ridge_metrics.mse, ridge_metrics.mae, None),
        (
            f"online baseline (seasonal naive, {season})",
            *seasonal_naive(test_values, lookback, horizon, season),
            None,
        ),
        ("repeat last", *repeat_last(test_values, lookback, horizon), None),
        ("tft", None, None, None),
    ]
    click.echo(
        f"\n{series.name}, horizon {horizon}, lookback {lookback}, test windows "
        f"{len(test_values) - lookback - horizon + 1} x {len(series.columns)} channels"
    )
    click.echo(f"{'model':<42}{'MSE':>8}{'MAE':>8}{'90% PI cover':>14}")
    for label, mse, mae, cover in rows:
        if mse is None:
            click.echo(f"{label:<42}{'not built yet':>16}")
            continue
        cover_text = f"{cover:.3f}" if cover is not None else "-"
        click.echo(f"{label:<42}{mse:>8.3f}{mae:>8.3f}{cover_text:>14}")
    if series.name == "ETTh1" and horizon == 96:
        click.echo(
            "published (ETTh1, horizon 96): "
            + ", ".join(f"{n} {m:.3f}/{a:.3f}" for n, m, a in PUBLISHED)
        )
    click.echo(f"training: {result.seconds:.1f}s, best epoch {result.best_epoch}, seed {seed}")
    click.echo(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, python "
        f"{platform.python_version()}, torch {torch.__version__}, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    click.echo(
        "command: forecast bench accuracy --dataset "
        + " ".join(
            [
                str(dataset),
                f"--horizon {horizon}",
                f"--lookback {lookback}",
                f"--hidden {hidden}",
                f"--epochs {epochs}",
                f"--patience {patience}",
                f"--seed {seed}",
            ]
        )
    )


@command(bench, "sink")
@click.option("--batches", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option(
    "--batch-readings",
    type=click.IntRange(1, 1_000_000),
    default=2000,
    show_default=True,
    help="Readings per batch, each with one prediction.",
)
@click.option(
    "--horizon",
    type=click.IntRange(1, 1000),
    default=24,
    show_default=True,
    help="Prediction rows per reading.",
)
@click.option("--sensors", type=click.IntRange(1, 1_000_000), default=1000, show_default=True)
def bench_sink(batches: int, batch_readings: int, horizon: int, sensors: int) -> None:
    """Rows per second into a fresh chDB store in worker-sized batches."""
    from sinks.bench import run

    result = run(batches, batch_readings, horizon, sensors)
    click.echo(
        f"{result.batches} batches of {batch_readings} readings + "
        f"{batch_readings * horizon} prediction rows, {sensors} sensors"
    )
    click.echo(
        f"rows/s: {result.rows_per_second:,.0f}  (readings/s with their predictions: "
        f"{result.readings / result.seconds:,.0f})"
    )
    click.echo(
        f"flush per batch: p50 {result.flush_p50 * 1000:.0f} ms, "
        f"p99 {result.flush_p99 * 1000:.0f} ms"
    )
    click.echo(_machine())
    click.echo(
        f"command: forecast bench sink --batches {batches} --batch-readings "
        f"{batch_readings} --horizon {horizon} --sensors {sensors}"
    )


@command(bench, "fanout")
@click.option("--subscribers", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--messages", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.1),
    default=20.0,
    show_default=True,
    help="Predictions published per second.",
)
def bench_fanout(subscribers: int, messages: int, rate: float) -> None:
    """Latency from a prediction on Kafka to its frame at every websocket subscriber."""
    import asyncio

    from gateway.fanout_bench import run

    _settings()
    report = asyncio.run(run(subscribers, messages, rate))
    click.echo(
        f"{report['subscribers']} subscribers x {report['messages']} predictions = "
        f"{report['frames']} frames delivered"
    )
    click.echo(
        f"published -> received: p50 {report['p50'] * 1000:.1f} ms, "
        f"p99 {report['p99'] * 1000:.1f} ms, max {report['max'] * 1000:.1f} ms "
        "(budget: p99 < 100 ms)"
    )
    click.echo(_machine())
    click.echo(
        f"command: forecast bench fanout --subscribers {subscribers} --messages "
        f"{messages} --rate {rate}"
    )


def _machine() -> str:
    import torch

    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, python "
        f"{platform.python_version()}, torch {torch.__version__}, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}"
    )

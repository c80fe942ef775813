"""``forecast train``, ``forecast models ...`` and ``forecast bench ...`` (registered by
:mod:`forecast.cli`); the benchmarks themselves live in :mod:`bench`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click
import orjson

from forecast.cli_common import command, machine, settings_from_env
from forecast.errors import ForecastError

if TYPE_CHECKING:
    from bench.broker import Delays

PUBLISHED = [
    ("DLinear", 0.375, 0.399),
    ("PatchTST/64", 0.370, 0.400),
    ("FEDformer", 0.376, 0.419),
    ("Informer", 0.865, 0.713),
]


def _train_option_set(epochs: str, patience: str):
    """The training options, with the defaults a command applies in their help."""

    def decorate(fn):
        options = [
            click.option("--horizon", type=click.IntRange(1, 1000), default=96, show_default=True),
            click.option(
                "--lookback",
                type=click.IntRange(2, 5000),
                help="Readings the model sees (default: lstm 336, tft 96).",
            ),
            click.option(
                "--hidden",
                type=click.IntRange(1, 1024),
                help="Hidden size (default: lstm 64, tft 16).",
            ),
            click.option(
                "--epochs", type=click.IntRange(0, 1000), help=f"At most (default: {epochs})."
            ),
            click.option(
                "--patience",
                type=click.IntRange(1, 100),
                help=f"Epochs without validation improvement before stopping ({patience}).",
            ),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option(
                "--batches-per-epoch",
                type=click.IntRange(1, 1_000_000),
                help="tft: training batches per epoch (default 200).",
            ),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


# `forecast bench accuracy` keeps the configurations' defaults (its published numbers);
# `forecast train` trains longer and stops on the validation loss (models.fit.TRAIN_DEFAULTS).
_train_options = _train_option_set("lstm 10, tft 6", "lstm 3, tft 2")
_train_command_options = _train_option_set("lstm 50, tft 20", "lstm 5, tft 3")


def _fit(
    kind: str,
    data: Path,
    *,
    plan=None,
    season: int | None = None,
    targets: tuple[str, ...] = (),
    covariates: tuple[str, ...] = (),
    defaults: dict | None = None,
    **options,
):
    """Load a wide CSV, train ``kind`` on it with a progress line; the Fitted model.
    Without a ``plan`` the split is the ETT protocol's (``forecast bench accuracy``)."""
    from models.data import load_wide_csv
    from models.fit import configure, fit_prepared, prepare

    given = {k: v for k, v in options.items() if v is not None}
    config = configure(kind, **{**(defaults or {}), **given})
    series = load_wide_csv(data, targets or None, covariates or None)
    prepared = prepare(kind, series, config, plan=plan, season=season)
    config = prepared.config
    for line in _describe(prepared):
        click.echo(line, err=True)
    line = _EpochLine(kind, config.epochs)
    try:
        fitted = fit_prepared(prepared, line)
    finally:
        line.close()
    fitted.meta["data"]["file"] = str(data)
    return series, fitted


def _describe(prepared) -> list[str]:
    """What training is about to do: the data, the step and season, the split."""
    series, config, split = prepared.series, prepared.config, prepared.split
    shown = ", ".join(series.columns[:8]) + (", ..." if len(series.columns) > 8 else "")
    lines = [
        f"{series.name}: {len(series.values)} rows x {len(series.columns)} "
        f"target{'s' if len(series.columns) > 1 else ''} ({shown}); training {prepared.kind} "
        f"(lookback {config.lookback}, horizon {config.horizon}, at most {config.epochs} "
        f"epochs, patience {config.patience})",
        prepared.timing.describe(),
    ]
    if series.skipped:
        lines.append(f"not numeric, left out: {', '.join(series.skipped)}")
    train, valid, test = split.rows
    first_test = datetime.fromtimestamp(series.ts[train + valid], UTC).strftime("%Y-%m-%d %H:%M")
    windows = "/".join(str(n) for n in split.origins(config.horizon))
    lines.append(
        f"split: {prepared.plan.describe()}: train {train}, validation "
        f"{valid}, test {test} rows (test from {first_test}; windows {windows})"
    )
    if split.unused:
        lines.append(
            f"the ETT protocol leaves the last {split.unused} rows out "
            "(--protocol fractions uses every row)"
        )
    return lines


class _EpochLine:
    """Training progress on stderr: one line rewritten in place on a terminal, a line
    per epoch otherwise (logs), with the validation loss and the best so far."""

    def __init__(self, kind: str, epochs: int) -> None:
        import time

        self.kind, self.epochs = kind, epochs
        self.out = click.get_text_stream("stderr")
        self.tty = self.out.isatty()
        self.best, self.best_epoch, self.shown = float("inf"), 0, False
        self.clock = time.perf_counter
        self.started = self.clock()

    def __call__(self, epoch: int, row: dict) -> None:
        loss = row.get("valid_mse", row.get("valid_loss"))
        if loss < self.best:
            self.best, self.best_epoch = loss, epoch
        done = round(20 * epoch / self.epochs) if self.epochs else 20
        bar = "#" * done + "-" * (20 - done)
        what = "ridge start" if (self.kind == "lstm" and epoch == 0) else f"epoch {epoch}"
        text = (
            f"training {self.kind} [{bar}] {what}/{self.epochs}  validation {loss:.4f}  "
            f"best {self.best:.4f} (epoch {self.best_epoch})  {self.clock() - self.started:.0f}s"
        )
        if self.tty:
            self.out.write(f"\r{text}\x1b[K")
        else:
            self.out.write(text + "\n")
        self.out.flush()
        self.shown = True

    def close(self) -> None:
        if self.tty and self.shown:
            self.out.write("\n")
            self.out.flush()


def _columns(_ctx, _param, values: tuple[str, ...]) -> tuple[str, ...]:
    """Repeated and comma-separated column names, in order."""
    return tuple(name.strip() for value in values for name in value.split(",") if name.strip())


def _fractions(_ctx, _param, value: str | None):
    if value is None:
        return None
    from models.data import parse_fractions

    try:
        return parse_fractions(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@command(None, "train")
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Wide CSV: a time column, then one column per channel.",
)
@click.option("--model", type=click.Choice(["lstm", "tft"]), default="lstm", show_default=True)
@_train_command_options
@click.option(
    "--target",
    "targets",
    multiple=True,
    callback=_columns,
    metavar="COL",
    help="A column to forecast (repeat, or COL,COL; default: every numeric column).",
)
@click.option(
    "--covariates",
    multiple=True,
    callback=_columns,
    metavar="COL",
    help="Columns fed as extra inputs where a model can use them (neither model does yet).",
)
@click.option(
    "--split",
    "fractions",
    callback=_fractions,
    metavar="TRAIN,VALID,TEST",
    help="Chronological fractions of every row (default 0.7,0.1,0.2).",
)
@click.option(
    "--protocol",
    type=click.Choice(["fractions", "ett"]),
    default="fractions",
    show_default=True,
    help="ett: the published 8640/2880/2880-row split of the ETT benchmark (the later "
    "rows unused; 60/20/20 for shorter files), as `forecast bench accuracy` uses.",
)
@click.option(
    "--season",
    type=click.IntRange(2, 100_000),
    metavar="STEPS",
    help="Readings in a season (default: one day of readings, detected from the times).",
)
@click.option(
    "--cadence",
    type=click.IntRange(1, 100_000),
    help="tft: forecast every k readings of a sensor (default 1).",
)
@click.option("--name", help="Registry name (default: the model kind).")
@click.option(
    "--promote",
    type=click.Choice(["production", "shadow"]),
    help="Put the new version in this stage at once.",
)
@click.option(
    "--result",
    "result_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the outcome as JSON (name, version, stage, metrics) to this file.",
)
def train(
    data: Path,
    model: str,
    targets: tuple[str, ...],
    covariates: tuple[str, ...],
    fractions: tuple[float, float, float] | None,
    protocol: str,
    season: int | None,
    name: str | None,
    promote: str | None,
    result_file: Path | None,
    **options,
) -> None:
    """Train a model on a chronological split of a wide CSV, evaluate it and register it.

    Every row is used: the first 70% train, the next 10% stop training (validation),
    the latest 20% score it (--split to change). The step and the season come from the
    time column."""
    from models.data import FRACTIONS, SplitPlan
    from models.fit import TRAIN_DEFAULTS
    from models.registry import Registry

    if protocol == "ett" and fractions is not None:
        raise click.UsageError("--split applies to --protocol fractions, not ett")
    settings = settings_from_env()
    plan = SplitPlan(protocol, fractions or FRACTIONS)
    _series, fitted = _fit(
        model,
        data,
        plan=plan,
        season=season,
        targets=targets,
        covariates=covariates,
        defaults=TRAIN_DEFAULTS[model],
        **options,
    )
    registry = Registry(settings.models_dir)
    result = fitted.result
    version = registry.register(name or model, fitted.artifact, fitted.meta)
    for line in _outcome(fitted):
        click.echo(line)
    warning = _still_improving(fitted)
    if warning:
        click.echo(warning, err=True)
    click.echo(f"registered {name or model} v{version}")
    if promote:
        registry.promote(name or model, version, promote)
        click.echo(f"promoted {name or model} v{version} to {promote}")
        _warn_warm_up(registry.meta(name or model, version), promote)
    if result_file is not None:
        outcome = {
            "name": name or model,
            "version": version,
            "stage": promote,
            "valid": result.valid.as_dict(),
            "test": result.test.as_dict(),
            "rows": fitted.meta["data"]["rows"],
            "step_seconds": fitted.meta["data"]["step_seconds"],
            "season": fitted.meta["data"]["season"],
        }
        result_file.write_bytes(orjson.dumps(outcome))


def _outcome(fitted) -> list[str]:
    """What training gave: epochs and time, scores overall and per target, the baseline."""
    result, meta, config = fitted.result, fitted.meta, fitted.config
    last = meta["epochs_run"]
    how = (
        f"stopped after {config.patience} epochs without a better validation loss"
        if result.stopped_early
        else f"at most {config.epochs}"
    )
    lines = [
        f"best epoch {result.best_epoch} of {last} ({how}), trained in {result.seconds:.1f}s",
        f"valid: {_metrics(result.valid.as_dict())}",
        f"test:  {_metrics(result.test.as_dict())}",
        "test by target:",
    ]
    by_target = meta["metrics_by_target"]["test"]
    width = max(len(c) for c in by_target) + 2
    for column, scored in list(by_target.items())[:20]:
        lines.append(f"  {column:<{width}}{_metrics(scored)}")
    if len(by_target) > 20:
        lines.append(f"  ... and {len(by_target) - 20} more (forecast models show)")
    baseline = fitted.baseline
    if baseline is None:
        lines.append("seasonal naive: the rows before the test part hold less than a season")
    else:
        lines.append(
            f"seasonal naive (season {baseline['season']}), test: "
            f"{_metrics(baseline['test'])}; {fitted.kind} has the lower MSE at "
            f"{baseline['steps_beaten']} of {baseline['steps']} steps"
        )
    return lines


def _still_improving(fitted) -> str | None:
    """A warning when the last epoch was the best: more epochs would likely help."""
    result, config = fitted.result, fitted.config
    last = fitted.meta["epochs_run"]
    if config.epochs < 1 or result.stopped_early or result.best_epoch != last:
        return None
    return (
        f"warning: the best epoch was the last ({last} of at most {config.epochs}): the "
        f"validation loss was still falling; train longer with --epochs {config.epochs * 2}"
    )


def _warn_warm_up(meta: dict, stage: str) -> None:
    """Say how long a sensor waits for this version's first forecast, when that is more
    than a season: until then the fallback baseline (production) or nothing (shadow)."""
    from models.data import human_duration
    from models.registry import step_and_season, warm_up

    need = warm_up(meta)
    step, season = step_and_season(meta)
    if need <= season:
        return
    who = f"{meta['name']} v{meta['version']}"
    if stage == "production":
        until = 'its forecasts come from the fallback baseline ("model": "baseline")'
    else:
        until = "the shadow publishes nothing for it"
    click.echo(
        f"warning: {who} forecasts a sensor only once it has {need} readings "
        f"({human_duration(need * step)} of readings, one every {human_duration(step)}), "
        f"more than a season ({season}); until then {until}. Each version keeps its own "
        "state, so after this promotion every sensor warms up again, as do new sensors.",
        err=True,
    )


def _metrics(values: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in values.items())


@click.group()
def models() -> None:
    """List, inspect, promote and roll back registered models."""


def _registry():
    from models.registry import Registry

    return Registry(settings_from_env().models_dir)


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


@command(models, "importances")
@click.argument("name")
@click.argument("version", type=int)
def models_importances(name: str, version: int) -> None:
    """How much a TFT version attends to each input (encoder and decoder side)."""
    meta = _registry().meta(name, version)
    if "importances" not in meta:
        raise ForecastError(f"{name} v{version} ({meta['kind']}) has no variable importances")
    for side, weights in meta["importances"].items():
        click.echo(f"{side}:")
        for variable, weight in sorted(weights.items(), key=lambda kv: -kv[1]):
            click.echo(f"  {variable:<12}{weight:>7.1%}  {'#' * round(weight * 40)}")


@command(models, "promote")
@click.argument("name")
@click.argument("version", type=int)
@click.option(
    "--stage", type=click.Choice(["production", "shadow"]), default="production", show_default=True
)
def models_promote(name: str, version: int, stage: str) -> None:
    """Make a version serve (running workers switch within seconds)."""
    from forecast.cli_audit import audited
    from models.registry import Registry

    settings = settings_from_env()
    registry = Registry(settings.models_dir)
    with audited(settings, "models.promote", f"{name} v{version}", stage=stage):
        registry.promote(name, version, stage)
    click.echo(f"{name} v{version} is now {stage}")
    _warn_warm_up(registry.meta(name, version), stage)


@command(models, "rollback")
@click.option(
    "--stage", type=click.Choice(["production", "shadow"]), default="production", show_default=True
)
def models_rollback(stage: str) -> None:
    """Return a stage to the version it had before."""
    from forecast.cli_audit import audited
    from models.registry import Registry

    settings = settings_from_env()
    with audited(settings, "models.rollback", stage) as noted:
        ref = Registry(settings.models_dir).rollback(stage)
        noted["detail"].update(name=ref.name, version=ref.version)
    click.echo(f"{stage} is back to {ref.name} v{ref.version}")


@click.group()
def bench() -> None:
    """Benchmarks (they report what they measured, on which machine)."""


@command(bench, "accuracy")
@click.option(
    "--dataset", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@_train_options
@click.option(
    "--tft-lookback",
    type=click.IntRange(2, 5000),
    default=96,
    show_default=True,
    help="Encoder length of the TFT (--lookback is the LSTM's).",
)
@click.option("--skip-tft", is_flag=True, help="Leave the TFT out (it trains for minutes).")
@click.option(
    "--split",
    "fractions",
    callback=_fractions,
    metavar="TRAIN,VALID,TEST",
    help="Chronological fractions of every row (default: the ETT protocol's rows).",
)
@click.option(
    "--season",
    "given_season",
    type=click.IntRange(1, 10_000),
    help="Season of the seasonal naive, in steps (default: one day of readings).",
)
def bench_accuracy(
    dataset: Path,
    tft_lookback: int,
    skip_tft: bool,
    fractions: tuple[float, float, float] | None,
    given_season: int | None,
    **options,
) -> None:
    """Train and score our models under the published protocol (or --split); print the
    table, with the forecast steps at which each model beats the seasonal naive."""
    import torch

    from models.data import SplitPlan
    from models.evaluation import repeat_last, seasonal_naive
    from models.lstm import LinearLSTMNet
    from models.train import Metrics, evaluate

    settings_from_env()
    plan = None if fractions is None else SplitPlan("fractions", fractions)
    lstm_options = {**options, "batches_per_epoch": None}
    series, lstm = _fit("lstm", dataset, plan=plan, season=given_season, **lstm_options)
    config, result = lstm.config, lstm.result
    season = lstm.meta["data"]["season"]
    if config.lookback < season:
        raise ForecastError(f"--lookback {config.lookback} must cover a season ({season} steps)")
    ridge_only = LinearLSTMNet(config.lookback, config.horizon, config.hidden)
    ridge_only.load_state_dict(result.net.state_dict())
    torch.nn.init.zeros_(ridge_only.head.weight)
    torch.nn.init.zeros_(ridge_only.head.bias)
    ridge_metrics = evaluate(ridge_only.eval(), lstm.split.test)
    test_values = lstm.split.test[0]
    lookback, horizon = config.lookback, config.horizon
    rows = [
        ("lstm (ridge skip + LSTM residual)", result.test, f"{result.seconds:.0f}s", lstm),
        ("  its linear path alone", ridge_metrics, "", None),
    ]
    if not skip_tft:
        tft_options = {
            "horizon": horizon,
            "seed": options["seed"],
            "lookback": tft_lookback,
            "batches_per_epoch": options["batches_per_epoch"],
        }
        tft = _fit("tft", dataset, plan=plan, season=given_season, **tft_options)[1]
        label = f"tft (encoder {tft_lookback}, hidden {tft.config.hidden})"
        rows.append((label, tft.result.test, f"{tft.result.seconds:.0f}s", tft))
    naive = seasonal_naive(test_values, lookback, horizon, season)
    last = repeat_last(test_values, lookback, horizon)
    rows += [
        (f"online baseline (seasonal naive, {season})", Metrics(*naive, 0.0, None), "", None),
        ("repeat last", Metrics(*last, 0.0, None), "", None),
    ]
    click.echo(
        f"\n{series.name}, horizon {horizon}, lookback {lookback}, test windows "
        f"{len(test_values) - lookback - horizon + 1} x {len(series.columns)} channels"
    )
    header = f"{'model':<42}{'MSE':>8}{'MAE':>8}{'90% PI cover':>14}{'training':>10}"
    click.echo(f"{header}{'beats naive at':>16}")
    for label, scored, took, fitted in rows:
        cover = f"{scored.coverage:.3f}" if scored.coverage is not None else "-"
        naive_steps = fitted.baseline if fitted is not None else None
        beats = f"{naive_steps['steps_beaten']}/{naive_steps['steps']}" if naive_steps else ""
        click.echo(
            f"{label:<42}{scored.mse:>8.3f}{scored.mae:>8.3f}{cover:>14}{took:>10}{beats:>16}"
        )
    if series.name == "ETTh1" and horizon == 96:
        click.echo(
            "published (ETTh1, horizon 96): "
            + ", ".join(f"{n} {m:.3f}/{a:.3f}" for n, m, a in PUBLISHED)
        )
    click.echo(machine())
    given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items() if v is not None)
    split = "" if fractions is None else " --split " + ",".join(f"{f:g}" for f in fractions)
    click.echo(
        f"command: forecast bench accuracy --dataset {dataset} {given} "
        f"--tft-lookback {tft_lookback}{' --skip-tft' if skip_tft else ''}{split} "
        f"--season {season}"
    )


@command(bench, "drift")
@click.option(
    "--dataset", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--detectors",
    default="adwin,page_hinkley,kswin",
    show_default=True,
    help="Comma-separated: adwin, page_hinkley, kswin.",
)
@click.option("--injections", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option(
    "--shift",
    type=float,
    default=2.0,
    show_default=True,
    help="Level shift, in standard deviations of the week before.",
)
@click.option("--scale", type=float, default=3.0, show_default=True, help="Variance change factor.")
def bench_drift(dataset: Path, detectors: str, injections: int, shift: float, scale: float) -> None:
    """Detection delay on injected shifts and false alarms per 10,000 readings."""
    from dataclasses import replace

    from bench.drift import run, summary
    from models.data import load_wide_csv

    settings = settings_from_env()
    try:
        config = replace(settings.drift_config(), detectors=tuple(detectors.split(",")))
    except ValueError as exc:
        raise ForecastError(str(exc)) from exc
    series = load_wide_csv(dataset)
    click.echo(
        f"{series.name}: {len(series.values)} readings x {len(series.columns)} channels, "
        f"{injections} injections per channel and kind",
        err=True,
    )
    report = run(series, config, injections, shift, scale)
    for line in summary(report, config):
        click.echo(line)
    click.echo(
        f"level shift {shift} sd, variance x{scale}; delays in readings (missed after 500); "
        f"{report.readings} untouched readings; {report.seconds:.1f}s"
    )
    click.echo(machine())
    click.echo(
        f"command: forecast bench drift --dataset {dataset} --detectors {detectors} "
        f"--injections {injections} --shift {shift} --scale {scale}"
    )


@command(bench, "online")
@click.option(
    "--dataset",
    "datasets",
    required=True,
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Wide CSV to replay (repeat for several).",
)
@click.option("--horizon", type=click.IntRange(1, 1000), default=96, show_default=True)
@click.option("--lookback", type=click.IntRange(2, 5000), default=336, show_default=True)
@click.option("--hidden", type=click.IntRange(1, 1024), default=64, show_default=True)
@click.option(
    "--train-epochs",
    type=click.IntRange(0, 1000),
    default=10,
    show_default=True,
    help="LSTM epochs, as `forecast bench accuracy` (0: its ridge start only).",
)
@click.option(
    "--model-cache",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where trained LSTMs are kept between runs (default: ~/.cache/forecast-bench).",
)
@click.option(
    "--part",
    type=click.Choice(["test", "valid"]),
    default="test",
    show_default=True,
    help="The split part replayed (valid: to choose rates without looking at test).",
)
@click.option(
    "--origins", type=click.IntRange(1, 10_000_000), help="Replay the first N origins only."
)
@click.option(
    "--coverage",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.9,
    show_default=True,
    help="Nominal coverage of the intervals.",
)
@click.option(
    "--interval-rate",
    type=click.FloatRange(0),
    default=0.005,
    show_default=True,
    help="Step of each side's log width multiplier per scored pair (0: fixed intervals).",
)
@click.option(
    "--bias-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Weight of the newest residual in the per-step bias (0: no point correction).",
)
@click.option(
    "--error-clip",
    type=click.FloatRange(0, min_open=True),
    default=3.0,
    show_default=True,
    help="Residuals are clipped to this many sensor scales before they are learned.",
)
@click.option(
    "--max-bias",
    type=click.FloatRange(0),
    default=1.0,
    show_default=True,
    help="The bias stays within this many sensor scales.",
)
@click.option(
    "--width-bounds",
    type=(float, float),
    default=(0.25, 4.0),
    show_default=True,
    help="The width multiplier stays within these factors of the model's width.",
)
def bench_online(
    datasets: tuple[Path, ...],
    horizon: int,
    lookback: int,
    hidden: int,
    train_epochs: int,
    model_cache: Path | None,
    part: str,
    origins: int | None,
    width_bounds: tuple[float, float],
    **rates: float,
) -> None:
    """Replay a split in time order under delayed feedback: MSE, MAE and interval
    coverage of the LSTM with and without online adaptation."""
    from bench.online import OnlinePlan, command_line, run, table
    from bench.serving import DEFAULT_CACHE
    from models.online import OnlineConfig

    settings_from_env()
    config = OnlineConfig(horizon, min_width=width_bounds[0], max_width=width_bounds[1], **rates)
    cache = model_cache or DEFAULT_CACHE
    plans = [
        OnlinePlan(data, train_epochs, cache, lookback, horizon, hidden, part, origins)
        for data in datasets
    ]
    reports = [run(plan, config, lambda line: click.echo(line, err=True)) for plan in plans]
    click.echo(
        f"\nLSTM (lookback {lookback}, hidden {hidden}, {train_epochs} epochs), horizon "
        f"{horizon}, {part} split replayed in time order; a forecast learns only from "
        "actuals that existed when it was issued"
    )
    for line in table(reports, config):
        click.echo(line)
    click.echo(machine())
    click.echo(f"command: {command_line(plans, config, model_cache is not None)}")


def _serving_options(fn):
    """What serves in a bench: the LSTM (trained once, cached) or the baseline alone."""
    options = [
        click.option(
            "--model",
            type=click.Choice(["lstm", "baseline"]),
            default="lstm",
            show_default=True,
            help="lstm: a trained LSTM in production, the baseline as fallback; "
            "baseline: the baseline alone.",
        ),
        click.option(
            "--train-data",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Wide CSV the LSTM trains on (default: ../shared/data/ett/ETTh1.csv).",
        ),
        click.option(
            "--train-epochs",
            type=click.IntRange(0, 1000),
            default=3,
            show_default=True,
            help="LSTM epochs (0: its ridge start only).",
        ),
        click.option(
            "--model-cache",
            type=click.Path(file_okay=False, path_type=Path),
            help="Where trained LSTMs are kept between runs (default: ~/.cache/forecast-bench).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _served(
    model: str,
    train_data: Path | None,
    train_epochs: int,
    model_cache: Path | None,
    horizon: int = 24,
    tft_cadence: int | None = None,
):
    """The artifacts a bench registers: the LSTM (from the cache or trained now, with
    progress on stderr) and, with ``tft_cadence``, a TFT shadow."""
    from bench.serving import (
        DEFAULT_CACHE,
        DEFAULT_DATA,
        LstmPlan,
        Served,
        trained_lstm,
        untrained_tft,
    )

    if model == "baseline":
        return Served()
    data = train_data or DEFAULT_DATA
    if not data.is_file():
        raise ForecastError(f"no training data at {data}: pass --train-data FILE")
    plan = LstmPlan(data, train_epochs, model_cache or DEFAULT_CACHE, horizon=horizon)
    served = Served(trained_lstm(plan, lambda line: click.echo(line, err=True)))
    if tft_cadence is not None:
        served.tft = untrained_tft(tft_cadence)
    return served


def _serving_args(model: str, train_data: Path | None, train_epochs: int, cache: Path | None):
    """The serving options as given, for the command line to reproduce."""
    if model == "baseline":
        return " --model baseline"
    args = f" --model lstm --train-epochs {train_epochs}"
    args += f" --train-data {train_data}" if train_data else ""
    return args + (f" --model-cache {cache}" if cache else "")


@command(bench, "throughput")
@click.option("--readings", type=click.IntRange(1, 10_000_000), default=200_000, show_default=True)
@click.option(
    "--per-record",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="Readings per Kafka record (1 = one reading per record).",
)
@click.option("--sensors", type=click.IntRange(1, 1_000_000), default=1000, show_default=True)
@click.option("--horizon", type=click.IntRange(1, 1000), default=24, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(0, 64),
    default=0,
    show_default=True,
    help="Also run 1 and N worker processes (as `forecast up --workers N`); 0: not.",
)
@_serving_options
def bench_throughput(
    readings: int,
    per_record: int,
    sensors: int,
    horizon: int,
    workers: int,
    model: str,
    train_data: Path | None,
    train_epochs: int,
    model_cache: Path | None,
) -> None:
    """Readings/s through the worker, beside a plain Faust agent and a raw consumer."""
    import asyncio

    from bench.throughput import throughput

    settings_from_env()
    served = _served(model, train_data, train_epochs, model_cache, horizon)
    click.echo(
        f"filling {sensors} windows of {served.window}, then {readings} readings "
        f"({per_record} per record)...",
        err=True,
    )
    r = asyncio.run(throughput(readings, per_record, sensors, horizon, served, workers))
    click.echo(
        f"{r.readings} readings in {r.records} records over {sensors} sensors; "
        f"each forecast {horizon} steps ahead"
    )
    click.echo(served.describe())
    click.echo(
        f"warm-up (not timed): {r.warm.readings} readings ({served.window} per sensor) in "
        f"{r.warm.records} records, taken in by the worker in {r.warm_seconds:.1f}s"
    )
    engine = r.per_second(r.engine.seconds)
    for label, seconds in (
        ("raw aiokafka consumer (getmany + orjson)", r.raw_seconds),
        ("plain Faust agent (decode each record)", r.faust_seconds),
        ("engine worker (validate, forecast, publish)", r.engine.seconds),
    ):
        rate = r.per_second(seconds)
        click.echo(f"{label:<58}{rate:>12,.0f} readings/s  ({engine / rate:.2f}x)")
    click.echo(f"  served in the timed part: {r.engine.served.describe()}")
    click.echo(_stage_table(r.engine.stages, readings))
    for count, run in r.processes.items():
        rate = r.pool_per_second(run.seconds)
        label = f"engine, {count} worker process{'es' if count > 1 else ''} (warm-up too)"
        click.echo(f"{label:<58}{rate:>12,.0f} readings/s  ({engine / rate:.2f}x)")
        click.echo(f"  served in the timed part: {run.served.describe()}")
    if len(r.processes) == 2:
        one, many = (r.pool_per_second(run.seconds) for run in r.processes.values())
        click.echo(f"{workers} worker processes over 1: {many / one:.2f}x")
    click.echo("the ratio column is the in-process engine's rate over each row's rate")
    if r.processes:
        click.echo(
            "worker processes: the warm-up and the timed readings, from their start to "
            "their group's commit of the last record (start-up and rebalance included)"
        )
    click.echo(machine())
    click.echo(
        f"command: forecast bench throughput --readings {readings} --per-record {per_record} "
        f"--sensors {sensors} --horizon {horizon}"
        + (f" --workers {workers}" if workers else "")
        + _serving_args(model, train_data, train_epochs, model_cache)
    )


def _stage_table(stages: dict[str, float], readings: int) -> str:
    """Where the in-process worker's time went in the timed part, per reading."""
    if not stages:
        return "  (no stage times)"
    rows = [
        f"    {name:<24}{seconds / readings * 1e6:>8.1f} µs/reading"
        for name, seconds in sorted(stages.items(), key=lambda item: -item[1])
    ]
    total = sum(stages.values()) / readings * 1e6
    rows.append(f"    {'(all stages)':<24}{total:>8.1f} µs/reading")
    head = "  the worker's stages (wall time; the rest is Faust, asyncio, the broker):"
    return "\n".join([head, *rows])


def _delays(d: Delays) -> str:
    """Percentiles of a bench's delays (``bench.broker.Delays``), in ms."""
    return f"p50 {d.p50 * 1000:.1f} ms, p99 {d.p99 * 1000:.1f} ms, max {d.max * 1000:.1f} ms"


@command(bench, "broker")
@click.option("--rate", type=click.FloatRange(1, 100_000), default=1000.0, show_default=True)
@click.option("--seconds", type=click.FloatRange(1, 3600), default=5.0, show_default=True)
@click.option(
    "--stored",
    default="0,5000,10000,20000",
    show_default=True,
    help="Comma-separated: records (one batch each) the topic holds before each run.",
)
def bench_broker(rate: float, seconds: float, stored: str) -> None:
    """One pass through the broker: readings at a steady rate to a raw aiokafka consumer,
    as the topic grows (the embedded broker, or FORECAST_KAFKA_BOOTSTRAP's)."""
    import asyncio

    from bench.broker import broker_hops

    settings_from_env()
    try:
        counts = sorted({int(c) for c in stored.split(",") if c.strip()})
    except ValueError:
        raise click.BadParameter("integers separated by commas", param_hint="--stored") from None
    if not counts or counts[0] < 0:
        raise click.BadParameter("at least one count, none negative", param_hint="--stored")

    def say(line: str) -> None:
        click.echo(line, err=True)

    say(f"{rate:.0f} readings/s for {seconds:.0f}s, after {', '.join(map(str, counts))} stored")
    results = asyncio.run(broker_hops(rate, seconds, counts, say=say))
    for held, delays in results.items():
        click.echo(f"topic holding {held:>7} records: reading -> raw consumer {_delays(delays)}")
    click.echo(machine())
    listed = ",".join(map(str, counts))
    click.echo(
        f"command: forecast bench broker --rate {rate:g} --seconds {seconds:g} --stored {listed}"
    )


@command(bench, "latency")
@click.option("--rate", type=click.FloatRange(1, 100_000), default=1000.0, show_default=True)
@click.option("--sensors", type=click.IntRange(1, 1_000_000), default=1000, show_default=True)
@click.option("--seconds", type=click.FloatRange(1, 3600), default=30.0, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Worker processes (1: one worker in the bench's process, as `forecast up`).",
)
@click.option(
    "--worker-process",
    is_flag=True,
    help="Run even one worker in a process of its own (as `forecast worker` beside "
    "`forecast gateway`), not in the gateway's event loop.",
)
@_serving_options
def bench_latency(
    rate: float,
    sensors: int,
    seconds: float,
    workers: int,
    worker_process: bool,
    model: str,
    train_data: Path | None,
    train_epochs: int,
    model_cache: Path | None,
) -> None:
    """Reading produced to prediction received by a websocket subscriber."""
    import asyncio

    from bench.throughput import latency

    settings_from_env()
    served = _served(model, train_data, train_epochs, model_cache)
    click.echo(f"{rate:.0f} readings/s over {sensors} sensors for {seconds:.0f}s...", err=True)
    r = asyncio.run(latency(rate, sensors, seconds, served, workers, worker_process))
    click.echo(served.describe())
    click.echo(
        f"warm-up (not timed): {r.warm.readings} readings ({served.window} per sensor) in "
        f"{r.warm.records} records, taken in by {workers} worker"
        f"{'s' if workers > 1 else ''} {r.warm_seconds:.1f}s after their start"
    )
    click.echo(f"sent {r.sent} readings, {r.engine.count} predictions received")
    budget = 100 if rate >= 10_000 else 50
    click.echo(
        f"reading -> prediction at the subscriber: {_delays(r.engine)} (budget: p99 < {budget} ms)"
    )
    click.echo(
        f"reading -> raw aiokafka consumer, same topic and moment (one broker hop; the "
        f"engine makes two): {_delays(r.raw)}"
    )
    models = ", ".join(f"{m} {n}" for m, n in r.served.most_common()) or "none"
    click.echo(f"served in the timed part: {models}; fallbacks {r.served['baseline']}")
    click.echo(machine())
    click.echo(
        f"command: forecast bench latency --rate {rate:g} --sensors {sensors} --seconds "
        f"{seconds:g} --workers {workers}{' --worker-process' if worker_process else ''}"
        + _serving_args(model, train_data, train_epochs, model_cache)
    )


@command(bench, "api")
@click.option(
    "--duration",
    type=click.FloatRange(0.5, 3600),
    default=20.0,
    show_default=True,
    help="Seconds per scenario.",
)
@click.option(
    "--rate",
    type=click.FloatRange(1, 100_000),
    default=1000.0,
    show_default=True,
    help="Readings/s of the stream running beside the load.",
)
@click.option("--sensors", type=click.IntRange(1, 1_000_000), default=1000, show_default=True)
@click.option(
    "--scenarios",
    default="latest,history,forecast,batch",
    show_default=True,
    help="Comma-separated, run in this order.",
)
@click.option(
    "--scale",
    type=click.FloatRange(0.001, 100),
    default=1.0,
    show_default=True,
    help="Times every scenario's request rate.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Worker processes of the started system (1: inside it, as `forecast up`).",
)
@click.option("--url", help="An API already running (then no system is started).")
@click.option("--key", help="Its API key (viewer role at least), with --url.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead.")
def bench_api(
    duration: float,
    rate: float,
    sensors: int,
    scenarios: str,
    scale: float,
    workers: int,
    url: str | None,
    key: str | None,
    as_json: bool,
) -> None:
    """The HTTP API under an open-loop load: requests/s and p50/p95/p99 per scenario."""
    import asyncio

    from bench.api import Plan, parse_scenarios, run, table

    settings_from_env()
    if key is not None and url is None:
        raise ForecastError("--key goes with --url")
    plan = Plan(parse_scenarios(scenarios), duration, rate, sensors, scale, url, key, workers)
    results = asyncio.run(run(plan, lambda line: click.echo(line, err=True)))
    given = f" --url {url}" if url else f" --rate {rate:g} --sensors {sensors} --workers {workers}"
    line = (
        f"forecast bench api --duration {duration:g} --scenarios {scenarios} "
        f"--scale {scale:g}{given}"
    )
    stream = "an existing system" if url else f"{rate:g} readings/s over {sensors} sensors"
    if as_json:
        out = {"stream": stream, "scenarios": [r.to_json() for r in results]}
        click.echo(orjson.dumps({**out, "machine": machine(), "command": line}).decode())
        return
    click.echo(f"HTTP API under open-loop load, {duration:g}s per scenario, stream: {stream}")
    for row in table(results):
        click.echo(row)
    click.echo(machine())
    click.echo(f"command: {line}")


@command(bench, "restore")
@click.option("--sensors", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True)
@click.option(
    "--sample",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="Sensors checked against a worker that was not restarted.",
)
@_serving_options
def bench_restore(
    sensors: int,
    sample: int,
    model: str,
    train_data: Path | None,
    train_epochs: int,
    model_cache: Path | None,
) -> None:
    """State restored after a worker restart: its start to every sensor's next forecast."""
    import asyncio

    from bench.restore import restore

    settings_from_env()
    served = _served(model, train_data, train_epochs, model_cache)
    click.echo(f"filling {sensors} windows of {served.window}...", err=True)
    r = asyncio.run(restore(sensors, served, sample))
    click.echo(served.describe())
    click.echo(
        f"filled: {r.fill.readings} readings ({served.window} per sensor) in {r.fill.records} "
        f"records, committed by the first worker {r.fill_seconds:.1f}s after its start; "
        "it stopped gracefully"
    )
    models = ", ".join(f"{m} {n}" for m, n in r.served.most_common()) or "none"
    click.echo(
        f"restore: a new worker recovered the state of {r.predicted} of {r.sensors} sensors "
        f"and forecast their next reading in {r.seconds:.2f}s (budget: under 5 s for 10,000)"
    )
    click.echo(f"served after the restart: {models}; fallbacks {r.served['baseline']}")
    click.echo(
        f"check: {r.matched} of {r.sample} sampled sensors forecast as by a worker that was "
        f"not restarted (largest relative difference {r.max_diff:.1e})"
    )
    click.echo(machine())
    click.echo(
        f"command: forecast bench restore --sensors {sensors} --sample {sample}"
        + _serving_args(model, train_data, train_epochs, model_cache)
    )


@command(bench, "memory")
@click.option("--sensors", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True)
@click.option(
    "--minutes",
    type=click.FloatRange(0, 1440),
    default=5.0,
    show_default=True,
    help="How long to run after every window is full (the design asks for 30).",
)
@click.option("--tft-cadence", type=click.IntRange(1, 10_000), default=24, show_default=True)
@click.option(
    "--interval",
    type=click.FloatRange(0.1, 600),
    default=2.0,
    show_default=True,
    help="Seconds between samples of the worker's resident memory.",
)
@_serving_options
def bench_memory(
    sensors: int,
    minutes: float,
    tft_cadence: int,
    interval: float,
    model: str,
    train_data: Path | None,
    train_epochs: int,
    model_cache: Path | None,
) -> None:
    """Resident memory of a worker holding state for many sensors, LSTM and TFT loaded."""
    import asyncio

    import numpy as np

    from bench.memory import memory

    settings_from_env()
    served = _served(model, train_data, train_epochs, model_cache, tft_cadence=tft_cadence)
    shown = {"at": -1.0}

    def progress(phase: str, minute: float, mib: float) -> None:
        if minute - shown["at"] >= 0.5:
            shown["at"] = minute
            click.echo(f"{minute:6.1f} min  {phase:<8}{mib:8.0f} MiB", err=True)

    r = asyncio.run(memory(sensors, minutes, served, interval, progress))
    click.echo(served.describe())
    click.echo(
        f"{sensors} sensors: windows filled with {r.fill.readings:,} readings in "
        f"{r.fill.records:,} records in {r.fill_seconds:.1f}s; then {r.readings:,} readings "
        f"({r.rounds} rounds of one per sensor) over {r.seconds / 60:.1f} min "
        f"({r.readings / max(r.seconds, 1e-9):,.0f} readings/s)"
    )
    steady = r.steady
    click.echo(
        f"worker resident memory once every window was full: min {steady[:, 1].min():.0f} MiB, "
        f"max {steady[:, 1].max():.0f} MiB, slope {r.slope:+.2f} MiB/min over "
        f"{steady[-1, 0]:.1f} min ({len(steady)} samples); peak {r.peak:.0f} MiB "
        "(budget: under 1536 MiB, flat)"
    )
    marks = np.linspace(0, len(steady) - 1, min(len(steady), 11)).round().astype(int)
    click.echo(
        "over time (min: MiB): "
        + "  ".join(f"{steady[i, 0]:.1f}: {steady[i, 1]:.0f}" for i in marks)
    )
    if len(r.pids) > 1:
        click.echo(f"the worker restarted: pids {sorted(r.pids)}")
    click.echo(machine())
    click.echo(
        f"command: forecast bench memory --sensors {sensors} --minutes {minutes:g} "
        f"--tft-cadence {tft_cadence} --interval {interval:g}"
        + _serving_args(model, train_data, train_epochs, model_cache)
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
    """The sink's rate: worker-sized Arrow batches from the store topic into chDB."""
    from bench.sink import run

    result = run(batches, batch_readings, horizon, sensors)
    click.echo(
        f"{result.batches} batches of {batch_readings} readings, each with a {horizon}-step "
        f"prediction ({result.records} store records), {sensors} sensors"
    )
    click.echo(
        f"sink: {result.predictions_per_second:,.0f} predictions/s with their readings "
        f"({result.rows_per_second:,.0f} rows/s; "
        f"{result.predictions_per_second * horizon:,.0f} prediction steps/s)"
    )
    click.echo(
        f"worker side: {result.encode_seconds / result.readings * 1e6:.1f} us per reading "
        "to build and encode the Arrow records"
    )
    click.echo(machine())
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

    from bench.fanout import run

    settings_from_env()
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
    click.echo(machine())
    click.echo(
        f"command: forecast bench fanout --subscribers {subscribers} --messages "
        f"{messages} --rate {rate}"
    )

"""The ``forecast`` command line. Every command has ``--help``; errors are one line."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import io
import os
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import click
import orjson

from forecast import cli_audit, cli_backup, cli_forecast, cli_models, cli_webhooks
from forecast.cli_common import command
from forecast.cli_common import settings_from_env as _settings
from forecast.errors import ForecastError
from forecast.settings import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="forecast-engine")
def main() -> None:
    """Streaming real-time forecasting engine.

    Configuration comes from FORECAST_* environment variables (see the README).
    """


# -- running ----------------------------------------------------------------------------


@command(main, "up")
@click.option(
    "--replay",
    "replay_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Feed this wide CSV once the system is up.",
)
@click.option(
    "--simulate",
    "sensors",
    type=click.IntRange(min=1),
    help="Feed N simulated sensors once the system is up.",
)
@click.option(
    "--speed",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Replay speed, times real time (0 = as fast as possible).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.1),
    default=100.0,
    show_default=True,
    help="Simulated readings per second, all sensors together.",
)
@click.option(
    "--workers",
    default="1",
    show_default=True,
    help="Worker processes sharing the partitions: a number, or `auto` (one per core).",
)
def up(
    replay_file: Path | None, sensors: int | None, speed: float, rate: float, workers: str
) -> None:
    """Run everything on embedded defaults: broker, workers, sink, gateway, dashboard."""
    from forecast.runtime import Parts, run
    from streams.feeds import replay_csv, simulate

    settings = _settings()
    count = _worker_count(workers)
    feeder = None
    if replay_file is not None:
        feeder = functools.partial(replay_csv, path=replay_file, speed=speed)
    elif sensors is not None:
        feeder = functools.partial(simulate, sensors=sensors, rate=rate)
    asyncio.run(run(settings, Parts(workers=count), feeder=feeder))


def _worker_count(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise ForecastError(f"--workers {text!r}: a number from 1 to 64, or auto")
    return int(text)


@command(main, "worker")
def worker() -> None:
    """Run a stream worker (and its /metrics, /healthz, /readyz on FORECAST_HTTP_PORT)."""
    from forecast.runtime import Parts, run

    asyncio.run(run(_settings(), Parts(worker=True, sink=False, gateway=False)))


@command(main, "sink")
def sink() -> None:
    """Run the ClickHouse sink, the retraining loop and the HTTP API with analyst SQL."""
    from forecast.runtime import Parts, run

    asyncio.run(run(_settings(), Parts(worker=False, sink=True, gateway=False)))


@command(main, "gateway")
def gateway() -> None:
    """Run the websocket gateway and the HTTP API."""
    from forecast.runtime import Parts, run

    asyncio.run(run(_settings(), Parts(worker=False, sink=False, gateway=True)))


@command(main, "broker")
def broker() -> None:
    """Run the embedded Kafka broker (tansu, in memory) with the engine's topics."""
    from streams.broker import EmbeddedBroker, ensure_topics

    settings = _settings()

    async def serve() -> None:
        async with EmbeddedBroker(settings.broker_port) as embedded:
            await ensure_topics(embedded.bootstrap, settings)
            click.echo(f"kafka: {embedded.bootstrap} (in memory: nothing kept after stop)")
            click.echo(f"use: FORECAST_KAFKA_BOOTSTRAP={embedded.bootstrap}; Ctrl-C to stop")
            await _until_signalled()

    asyncio.run(serve())


async def _until_signalled() -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# -- feeding ----------------------------------------------------------------------------


def _bootstrap(settings: Settings) -> str:
    if settings.kafka_bootstrap is None:
        raise ForecastError(
            "FORECAST_KAFKA_BOOTSTRAP is not set: start `forecast broker` or `forecast up`, "
            "or use `forecast up --replay FILE`"
        )
    return settings.kafka_bootstrap


async def _with_producer(settings: Settings, send: Callable) -> int:
    from aiokafka import AIOKafkaProducer

    from streams.broker import wait_until_ready

    bootstrap = _bootstrap(settings)
    await wait_until_ready(bootstrap, 10.0)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await producer.start()
    try:
        return await send(producer, settings.topic("readings"))
    finally:
        await producer.stop()


def _progress(label: str) -> Callable[[int], None]:
    def report(sent: int) -> None:
        click.echo(f"\r{label}: {sent} readings sent", nl=False, err=True)

    return report


@command(main, "replay")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--prefix", help="Sensor id prefix (default: the file name without extension).")
@click.option(
    "--speed",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Times real time; 0 = as fast as possible.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Send at most this many rows.")
@click.option(
    "--start",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="First data row to send (0-based).",
)
@click.option(
    "--batch/--no-batch",
    default=False,
    show_default=True,
    help="Send each row as one batch record (JSON array).",
)
def replay(
    file: Path, prefix: str | None, speed: float, limit: int | None, start: int, batch: bool
) -> None:
    """Replay a wide CSV (a time column; every other column becomes sensor PREFIX.COLUMN)."""
    from streams.feeds import replay_csv

    settings = _settings()
    sent = asyncio.run(
        _with_producer(
            settings,
            lambda producer, topic: replay_csv(
                producer,
                topic,
                file,
                prefix=prefix,
                speed=speed,
                limit=limit,
                start=start,
                batch=batch,
                progress=_progress("replay"),
            ),
        )
    )
    click.echo(f"\nreplayed {sent} readings from {file}")


@command(main, "simulate")
@click.option("--sensors", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.1),
    default=100.0,
    show_default=True,
    help="Readings per second, all sensors together.",
)
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many readings.")
@click.option("--prefix", default="sim", show_default=True)
def simulate_cmd(sensors: int, rate: float, count: int | None, prefix: str) -> None:
    """Send synthetic readings of N sensors (noisy daily sines) at a rate."""
    from streams.feeds import simulate

    settings = _settings()
    sent = asyncio.run(
        _with_producer(
            settings,
            lambda producer, topic: simulate(
                producer,
                topic,
                sensors=sensors,
                rate=rate,
                count=count,
                prefix=prefix,
                progress=_progress("simulate"),
            ),
        )
    )
    click.echo(f"\nsent {sent} readings")


# -- analysts ---------------------------------------------------------------------------


@command(main, "query")
@click.argument("sql")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@click.option("--max-rows", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True)
@click.option(
    "--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True, help="Seconds."
)
def query(sql: str, fmt: str, max_rows: int, timeout: float) -> None:
    """Run one read-only SQL statement against ClickHouse (database `forecast`).

    One SELECT or DESCRIBE, judged by ClickHouse's parser: no INTO OUTFILE, FORMAT or
    SETTINGS, only generator table functions, only the engine's views and a few system
    tables; run read-only with the FORECAST_QUERY_* caps."""
    from sinks.query import QueryResult

    settings = _settings()
    result: QueryResult = _run_query(settings, sql, max_rows, timeout)
    click.echo(_render(result, fmt), nl=False)
    if result.truncated:
        click.echo(f"(truncated to {max_rows} rows)", err=True)


def _through_store(
    settings: Settings,
    local: Callable[[Any], Any],
    remote: Callable[[Any, Any], Any],
    timeout: float,
) -> Any:
    """Run ``local(store)`` on the store, or ``remote(client, owner)`` through the running
    process that owns the embedded store (chDB allows one process per directory)."""
    from sinks import owner
    from sinks.clickhouse import Store

    running = owner.find(settings.run_dir) if settings.clickhouse_url is None else None
    if running is None:
        store = Store.open(settings)
        try:
            return local(store)
        finally:
            store.close()
    import httpx

    headers = {"Authorization": f"Bearer {running.token}", **cli_audit.actor_header()}
    try:
        with httpx.Client(base_url=running.url, headers=headers, timeout=timeout + 5) as client:
            response = remote(client, running)
    except httpx.HTTPError as exc:
        raise ForecastError(f"the running engine at {running.url} did not answer: {exc}") from exc
    if isinstance(response, int):  # a download, written already
        return response
    if response.status_code != 200:
        _raise_answer(response)
    return response


def _raise_answer(response: Any) -> None:
    body = response.json()
    raise ForecastError(f"{body['error']['code']}: {body['error']['message']}")


def _run_query(settings: Settings, sql: str, max_rows: int, timeout: float) -> Any:
    from sinks.audit import sql_detail
    from sinks.query import QueryLimits, QueryResult, run_readonly

    limits = QueryLimits.from_settings(settings, max_rows=max_rows, timeout=timeout)

    def local(store: Any) -> QueryResult:
        with cli_audit.audited(settings, "query", "sql", store, **sql_detail(sql)):
            return run_readonly(store, sql, limits)

    result = _through_store(
        settings,
        local,
        lambda client, _: client.post(
            "/v1/query", json={"sql": sql, "max_rows": min(max_rows, 10_000)}
        ),
        timeout,
    )
    if isinstance(result, QueryResult):
        return result
    body = result.json()
    return QueryResult(body["columns"], [tuple(r) for r in body["rows"]], body["truncated"])


@command(main, "export")
@click.option(
    "--what",
    type=click.Choice(["predictions", "errors"]),
    default="predictions",
    show_default=True,
    help="Predictions, or each step beside its actual.",
)
@click.option("--sensors", default="*", show_default=True, help="Glob pattern of sensor ids.")
@click.option("--from", "start", help="RFC 3339; forecasts issued for readings from then.")
@click.option("--to", "stop", help="RFC 3339; up to (not including) then.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "json", "parquet"]),
    default="csv",
    show_default=True,
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write (default: standard output; required for parquet).",
)
def export_cmd(
    what: str, sensors: str, start: str | None, stop: str | None, fmt: str, output: Path | None
) -> None:
    """Export predictions or forecast errors for a sensor pattern and a time range."""
    from forecast.parsing import Invalid, parse_time
    from sinks.export import ExportRequest, export

    if fmt == "parquet" and output is None:
        raise ForecastError("--format parquet needs --output FILE")
    try:
        bounds = [
            None if t is None else datetime.fromtimestamp(parse_time(t), UTC) for t in (start, stop)
        ]
    except Invalid as exc:
        raise ForecastError(f"bad time: {exc.detail}") from None
    wanted = ExportRequest(what, sensors, bounds[0], bounds[1], fmt)
    settings = _settings()
    params = {"what": what, "sensors": sensors, "format": fmt}
    params.update({k: v for k, v in (("from", start), ("to", stop)) if v})

    def local(store: Any) -> int:
        detail = {k: v for k, v in params.items() if k != "what"}
        with cli_audit.audited(settings, "export", what, store, **detail):
            chunks = export(store, wanted, None, settings.export_max_rows, settings.export_timeout)
        return _write_chunks(chunks, sink)

    with contextlib.ExitStack() as stack:
        sink = (
            click.get_binary_stream("stdout")
            if output is None
            else stack.enter_context(output.open("wb"))
        )
        written = _through_store(
            settings,
            local,
            lambda client, _: _download(client, "/v1/export", params, sink),
            settings.export_timeout,
        )
    if output is not None:
        click.echo(f"wrote {written} bytes to {output}", err=True)


def _write_chunks(chunks: Iterable[bytes], sink: BinaryIO) -> int:
    written = 0
    for chunk in chunks:
        sink.write(chunk)
        written += len(chunk)
    return written


def _download(client: Any, path: str, params: dict, sink: BinaryIO) -> int:
    """Stream a GET's body into ``sink``; an error answer is raised as the engine's own."""
    with client.stream("GET", path, params=params) as response:
        if response.status_code != 200:
            response.read()
            _raise_answer(response)
        return _write_chunks(response.iter_bytes(), sink)


def _render(result: Any, fmt: str) -> str:
    if fmt == "json":
        rows = [dict(zip(result.columns, row, strict=True)) for row in result.rows]
        return orjson.dumps(rows, default=str).decode() + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(result.columns)
        writer.writerows(result.rows)
        return out.getvalue()
    cells = [[str(c) for c in result.columns]] + [[_cell(v) for v in r] for r in result.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(result.columns))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# -- keys -------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@command(keys, "create")
@click.option(
    "--role",
    type=click.Choice(["viewer", "analyst", "operator", "admin"]),
    default="viewer",
    show_default=True,
)
@click.option("--name", default="", help="A label for the key.")
@click.option(
    "--scope", "scopes", multiple=True, help="Sensor pattern the key may see (repeat; no commas)."
)
def keys_create(role: str, name: str, scopes: tuple[str, ...]) -> None:
    """Create a key and print it once (only its hash is stored)."""
    from gateway.auth import KeyStore

    settings = _settings()
    scopes = scopes or ("*",)
    with cli_audit.audited(settings, "keys.create", role=role, name=name, scopes=scopes) as noted:
        key_id, token = KeyStore.of(settings.data_dir).create(role, name, scopes)
        noted["target"] = key_id
    click.echo(
        f"key id: {key_id}\nrole:   {role}\ntoken:  {token}\n"
        "The token is shown only now; store it safely."
    )


@command(keys, "list")
def keys_list() -> None:
    """List keys (never their secrets)."""
    from gateway.auth import KeyStore

    for info in KeyStore.of(_settings().data_dir).list():
        created = datetime.fromtimestamp(info.created_at, UTC).isoformat(timespec="seconds")
        state = "revoked" if info.revoked_at else "active"
        click.echo(
            f"{info.key_id}  {info.role:<8}  {state:<7}  {created}  "
            f"{','.join(info.scopes)}  {info.name}"
        )


@command(keys, "revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id."""
    from gateway.auth import KeyStore

    settings = _settings()
    with cli_audit.audited(settings, "keys.revoke", key_id) as noted:
        if not KeyStore.of(settings.data_dir).revoke(key_id):
            noted["result"] = "not_found"
            raise ForecastError(f"no active key {key_id!r}")
    click.echo(f"revoked {key_id}")


for _commands in (
    cli_models.train,
    cli_models.models,
    cli_models.bench,
    cli_backup.backup,
    cli_backup.restore,
    cli_webhooks.webhooks,
    cli_forecast.forecast,
    cli_audit.audit,
):
    main.add_command(_commands)

"""``forecast webhooks add|list|remove|resume|deliveries`` (registered by :mod:`forecast.cli`).

They work on ``<data_dir>/webhooks.db`` directly; a running gateway's dispatcher sees the
changes at its next round."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import click

from forecast.cli_audit import audited
from forecast.cli_common import command, settings_from_env
from forecast.errors import ForecastError


def _store():
    from sinks.webhooks import WebhookStore

    return WebhookStore.from_settings(settings_from_env())


def _time(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@click.group()
def webhooks() -> None:
    """Post drift events, retraining decisions and alerts to HTTP endpoints."""


@command(webhooks, "add")
@click.argument("url")
@click.option(
    "--events",
    default="drift,decision,alert",
    show_default=True,
    help="Comma-separated: drift, decision, alert.",
)
@click.option(
    "--sensors", "sensors", multiple=True, help="Sensor glob pattern (repeat); default all."
)
@click.option(
    "--secret-from-env",
    "secret_env",
    metavar="VAR",
    help="Take the signing secret from this environment variable (else one is generated).",
)
def add(url: str, events: str, sensors: tuple[str, ...], secret_env: str | None) -> None:
    """Add an endpoint; its signing secret is printed once."""
    secret = None
    if secret_env is not None:
        secret = os.environ.get(secret_env)
        if not secret:
            raise ForecastError(f"--secret-from-env: {secret_env} is not set or empty")
    from sinks.webhook_targets import origin

    kinds, patterns = events.split(","), list(sensors or ("*",))
    with audited(
        settings_from_env(), "webhooks.add", url=origin(url), events=kinds, sensors=patterns
    ) as noted:
        endpoint, secret = _store().create(url, kinds, patterns, secret)
        noted["target"] = endpoint.id
    click.echo(f"webhook id: {endpoint.id}\nurl:        {endpoint.url}")
    click.echo(f"events:     {','.join(endpoint.events)}\nsensors:    {' '.join(endpoint.sensors)}")
    if secret_env is None:
        click.echo(f"secret:     {secret}\nThe secret is shown only now; store it safely.")
    else:
        click.echo(f"secret:     from ${secret_env}")


@command(webhooks, "list")
def list_() -> None:
    """List endpoints (never their secrets), with their state and pending deliveries."""
    for e in _store().list():
        state = e.state if e.state == "active" else f"PAUSED since {_time(e.paused_at)}"
        click.echo(
            f"{e.id}  {state}  failures={e.failures}  pending={e.pending}  "
            f"events={','.join(e.events)}  sensors={','.join(e.sensors)}  {e.url}"
        )


@command(webhooks, "remove")
@click.argument("webhook_id")
def remove(webhook_id: str) -> None:
    """Remove an endpoint and its queued deliveries."""
    with audited(settings_from_env(), "webhooks.remove", webhook_id):
        _store().remove(webhook_id)
    click.echo(f"removed {webhook_id}")


@command(webhooks, "resume")
@click.argument("webhook_id")
def resume(webhook_id: str) -> None:
    """Resume a paused endpoint; its pending deliveries are tried again now."""
    with audited(settings_from_env(), "webhooks.resume", webhook_id):
        endpoint = _store().resume(webhook_id)
    click.echo(f"resumed {endpoint.id} ({endpoint.pending} pending)")


@command(webhooks, "deliveries")
@click.argument("webhook_id")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
def deliveries(webhook_id: str, limit: int) -> None:
    """An endpoint's latest deliveries, newest first."""
    for d in _store().deliveries(webhook_id, limit):
        latency = "-" if d.latency is None else f"{d.latency * 1000:.0f}ms"
        click.echo(
            f"{d.id}  {d.event:<8}  {d.status:<9}  attempts={d.attempts}  "
            f"http={d.last_status or '-'}  {latency}  {_time(d.created_at)}  {d.last_error or ''}"
        )

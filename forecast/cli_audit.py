"""``forecast audit``: the audit log; and ``audited``, with which the commands that
change something (keys, model stages) or ask the store (query, export) record what they
did, as ``cli:<os user>`` with the role ``local``.

On the embedded default a record goes through the running process that owns the store
(``POST /v1/audit/local`` with its own token), or into the store opened here when none
runs. A record that cannot be written is a warning on stderr: the act stands.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import click
import orjson

from forecast.cli_common import command, settings_from_env
from forecast.errors import ForecastError
from forecast.parsing import Invalid, parse_time
from forecast.settings import Settings

log = logging.getLogger(__name__)

ACTOR_HEADER = "X-Forecast-Actor"


def local_actor() -> str:
    """``cli:<user>``: who runs this command on this machine."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid
        user = f"uid{os.getuid()}"
    return "cli:" + "".join(c if c.isalnum() or c in "._@-" else "_" for c in user)[:64]


def actor_header() -> dict[str, str]:
    """The header that names the local user to the owner (it believes it only from the
    owner's own token)."""
    return {ACTOR_HEADER: local_actor()}


@contextlib.contextmanager
def audited(
    settings: Settings, action: str, target: str = "", store: Any = None, **detail: Any
) -> Iterator[dict[str, Any]]:
    """Record the block's act: ``ok``, or the ForecastError's code (raised on). The
    block may set ``noted["target"]``, ``noted["result"]`` or add to
    ``noted["detail"]``; ``store``, when open already, takes the record."""
    noted: dict[str, Any] = {"target": target, "detail": dict(detail)}
    try:
        yield noted
    except ForecastError as exc:
        record_local(settings, action, noted, noted.get("result", exc.code), store)
        raise
    record_local(settings, action, noted, noted.get("result", "ok"), store)


def record_local(
    settings: Settings, action: str, noted: dict[str, Any], result: str, store: Any = None
) -> bool:
    """Write one record of the local user; False (and a warning) when it could not be."""
    from sinks.audit import AuditEvent, record

    event = AuditEvent(
        actor=local_actor(),
        role="local",
        action=action,
        target=str(noted.get("target") or ""),
        result=result,
        request_id=uuid.uuid4().hex,
        detail=noted.get("detail", {}),
    )
    try:
        written = _through_owner(settings, event) if store is None else record(store, event)
    except ForecastError as exc:
        log.error("audit record %s not written: %s", action, exc.message)
        written = False
    if not written:
        click.echo(f"warning: the audit record of {action} was not written", err=True)
    return written


def _through_owner(settings: Settings, event: Any) -> bool:
    from sinks import owner
    from sinks.audit import record
    from sinks.clickhouse import Store

    running = owner.find(settings.run_dir) if settings.clickhouse_url is None else None
    if running is None:
        store = Store.open(settings)
        try:
            return record(store, event)
        finally:
            store.close()
    import httpx

    body = {
        "actor": event.actor,
        "action": event.action,
        "target": event.target[:200],
        "result": event.result[:64],
        "detail": orjson.loads(orjson.dumps(event.detail, default=str)),
    }
    headers = {"Authorization": f"Bearer {running.token}", "X-Request-ID": event.request_id}
    try:
        response = httpx.post(
            f"{running.url}/v1/audit/local", json=body, headers=headers, timeout=10.0
        )
    except httpx.HTTPError as exc:
        raise ForecastError(f"the running engine at {running.url} did not answer: {exc}") from exc
    if response.status_code != 204:
        raise ForecastError(f"the running engine answered {response.status_code}")
    return True


# -- reading -----------------------------------------------------------------------------


def _time(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except Invalid as exc:
        raise ForecastError(f"{name} {text!r}: {exc.detail}") from None


@command(None, "audit")
@click.option("--since", help="RFC 3339 or epoch seconds; records at or after.")
@click.option("--until", help="RFC 3339 or epoch seconds; records before.")
@click.option("--actor", help="Only this actor (a key id, jwt:<sub>, cli:<user>).")
@click.option("--action", help="Only this action, or a prefix ending in '.' (keys.).")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
def audit(
    since: str | None,
    until: str | None,
    actor: str | None,
    action: str | None,
    limit: int,
    fmt: str,
) -> None:
    """Audit records, newest first: who changed keys and models, who queried and exported."""
    settings = settings_from_env()
    wanted = {
        "since": _time(since, "--since"),
        "until": _time(until, "--until"),
        "actor": actor,
        "action": action,
        "limit": limit,
    }
    rows = _read(settings, wanted)
    if fmt == "json":
        click.echo(orjson.dumps(rows).decode())
        return
    for row in rows:
        detail = orjson.dumps(row["detail"]).decode()
        click.echo(
            f"{row['at']}  {row['actor']:<16} {row['role']:<8} {row['action']:<16} "
            f"{row['target']:<20} {row['result']:<14} {row['request_id']}  {detail}"
        )


def _read(settings: Settings, wanted: dict[str, Any]) -> list[dict[str, Any]]:
    from forecast.schemas import iso
    from sinks import owner
    from sinks.audit import AuditFilter, read
    from sinks.clickhouse import Store

    running = owner.find(settings.run_dir) if settings.clickhouse_url is None else None
    if running is None:
        store = Store.open(settings)
        try:
            rows = read(store, AuditFilter(**wanted))
        finally:
            store.close()
        return [{**row, "at": iso(row["at"])} for row in rows]
    import httpx

    params = {k: v for k, v in wanted.items() if v is not None}
    for bound in ("since", "until"):
        if bound in params:
            params[bound] = datetime.fromtimestamp(params[bound], UTC).isoformat()
    try:
        response = httpx.get(
            f"{running.url}/v1/audit",
            params=params,
            headers={"Authorization": f"Bearer {running.token}"},
            timeout=30.0,
        )
    except httpx.HTTPError as exc:
        raise ForecastError(f"the running engine at {running.url} did not answer: {exc}") from exc
    if response.status_code != 200:
        found = response.json().get("error", {})
        raise ForecastError(f"{found.get('code')}: {found.get('message')}")
    return response.json()["records"]

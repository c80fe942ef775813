"""Webhook endpoints and their durable delivery queue, in ``<data_dir>/webhooks.db``.

Any process with the data directory may :meth:`WebhookStore.emit` an :class:`Event`
(the gateway for drift events, the retraining loop for its decisions, a worker for its
alerts): it becomes one ``pending`` delivery per endpoint that subscribes to its kind
and whose sensor patterns match one of its sensors (an event naming no sensor matches
every pattern). An event id is delivered at most once per endpoint, so two processes
emitting the same drift event queue it once. The dispatcher (:mod:`gateway.webhooks`)
claims due deliveries with a lease, so a delivery in flight when a process dies is
tried again once the lease runs out.

The signing secret is stored (it is needed to sign) in a file of mode 0600, shown once
at creation and never listed. Creation, removal and resumption are one function each.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from forecast.errors import WebhookError
from forecast.files import private_file
from forecast.options import parse_networks
from forecast.schemas import iso
from forecast.settings import Settings
from sinks.webhook_targets import Policy, Resolver, check_target, resolve

log = logging.getLogger(__name__)

EVENTS = ("drift", "decision", "alert")
MAX_BODY = 64 << 10  # bytes of one event's JSON body
MAX_PATTERNS = 50
MAX_PATTERN = 200
SECRET_LENGTH = (16, 256)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS endpoints (
        id TEXT PRIMARY KEY, url TEXT NOT NULL, events TEXT NOT NULL, sensors TEXT NOT NULL,
        secret TEXT NOT NULL, state TEXT NOT NULL, failures INTEGER NOT NULL,
        paused_at REAL, created_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS deliveries (
        id TEXT PRIMARY KEY, event_id TEXT NOT NULL, endpoint_id TEXT NOT NULL,
        event TEXT NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL,
        next_attempt_at REAL NOT NULL, status TEXT NOT NULL, last_status INTEGER,
        last_error TEXT, latency REAL, created_at REAL NOT NULL, done_at REAL,
        UNIQUE (event_id, endpoint_id))""",
    "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at)",
)


@dataclass(frozen=True, slots=True)
class Event:
    """Something an endpoint may subscribe to: ``kind`` is one of :data:`EVENTS`."""

    id: str
    kind: str
    data: dict
    sensors: tuple[str, ...] = ()
    created_at: float = field(default_factory=time.time)

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "type": self.kind,
                "created_at": iso(self.created_at),
                "sensors": list(self.sensors),
                "data": self.data,
            }
        )


def drift_event(message: dict) -> Event:
    """A `drift-events` message as an event; its id derives from its content, so every
    process that reads the same message emits the same id."""
    digest = hashlib.sha256(orjson.dumps(message, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return Event(f"drift-{digest[:32]}", "drift", message, (str(message["sensor_id"]),))


def decision_event(action: str, model: str, version: int, detail: dict) -> Event:
    """A step of the retraining loop (as stored in ``model_decisions``)."""
    sensors = tuple(str(s) for s in detail.get("sensors", ()))
    data = {"action": action, "model": model, "model_version": version, "detail": detail}
    return Event(f"decision-{secrets.token_hex(12)}", "decision", data, sensors)


def alert_event(
    alert: str, message: str, detail: dict | None = None, sensors: tuple[str, ...] = ()
) -> Event:
    """An alert-worthy condition (``worker_stalled``, ``coverage_collapsed``, ...)."""
    data = {"alert": alert, "message": message, "detail": detail or {}}
    return Event(f"alert-{secrets.token_hex(12)}", "alert", data, sensors)


@dataclass(frozen=True, slots=True)
class Endpoint:
    id: str
    url: str
    events: tuple[str, ...]
    sensors: tuple[str, ...]
    state: str  # active or paused
    failures: int  # consecutive failed attempts
    paused_at: float | None
    created_at: float
    pending: int = 0

    def wants(self, event: Event) -> bool:
        if event.kind not in self.events:
            return False
        return not event.sensors or any(
            fnmatchcase(sensor, pattern) for sensor in event.sensors for pattern in self.sensors
        )


@dataclass(frozen=True, slots=True)
class Delivery:
    id: str
    event_id: str
    endpoint_id: str
    event: str
    body: bytes
    attempts: int
    next_attempt_at: float
    status: str  # pending, delivered or failed (gave up)
    last_status: int | None
    last_error: str | None
    latency: float | None
    created_at: float
    done_at: float | None


@dataclass(frozen=True, slots=True)
class Due:
    """A claimed delivery with what it takes to send it."""

    delivery: Delivery
    url: str
    secret: str


ENDPOINT_COLUMNS = "id, url, events, sensors, state, failures, paused_at, created_at"
DELIVERY_COLUMNS = (
    "d.id, d.event_id, d.endpoint_id, d.event, d.body, d.attempts, d.next_attempt_at, d.status, "
    "d.last_status, d.last_error, d.latency, d.created_at, d.done_at"
)


class WebhookStore:
    """Endpoints and deliveries; safe to use from several threads and processes."""

    def __init__(
        self,
        path: Path,
        *,
        policy: Policy | None = None,
        max_endpoints: int = 50,
        max_pending: int = 10_000,
        resolver: Resolver = resolve,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.policy = policy or Policy()
        self.max_endpoints = max_endpoints
        self.max_pending = max_pending
        self.resolver = resolver
        private_file(path)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            for statement in SCHEMA:
                db.execute(statement)

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookStore:
        """The store in ``<data_dir>/webhooks.db`` with the configured target policy."""
        policy = Policy(
            settings.webhook_allow_private, parse_networks(settings.webhook_allow_networks)
        )
        return cls(
            settings.data_dir / "webhooks.db",
            policy=policy,
            max_endpoints=settings.webhook_max_endpoints,
        )

    @contextlib.contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        try:
            if write:
                db.execute("BEGIN IMMEDIATE")
            yield db
            if write:
                db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # -- endpoints ---------------------------------------------------------------------

    def create(
        self,
        url: str,
        events: Iterable[str],
        sensors: Iterable[str] = ("*",),
        secret: str | None = None,
    ) -> tuple[Endpoint, str]:
        """Add an endpoint (its target checked and resolved now); return it and its
        signing secret, which is not shown again."""
        events = check_events(events)
        sensors = check_patterns(sensors)
        if secret is None:
            secret = "whsec_" + secrets.token_urlsafe(32)
        elif not SECRET_LENGTH[0] <= len(secret) <= SECRET_LENGTH[1] or not secret.isprintable():
            raise WebhookError(
                f"a signing secret has {SECRET_LENGTH[0]}..{SECRET_LENGTH[1]} printable characters",
                code="bad_secret",
            )
        check_target(url, self.policy, self.resolver)
        endpoint = Endpoint(
            "wh_" + secrets.token_hex(6), url, events, sensors, "active", 0, None, time.time()
        )
        with self._db(write=True) as db:
            (count,) = db.execute("SELECT count(*) FROM endpoints").fetchone()
            if count >= self.max_endpoints:
                raise WebhookError(
                    f"at most {self.max_endpoints} webhooks (FORECAST_WEBHOOK_MAX_ENDPOINTS)",
                    code="too_many",
                )
            db.execute(
                "INSERT INTO endpoints VALUES (?, ?, ?, ?, ?, 'active', 0, NULL, ?)",
                (
                    endpoint.id,
                    url,
                    ",".join(events),
                    orjson.dumps(sensors).decode(),
                    secret,
                    endpoint.created_at,
                ),
            )
        host = urlsplit(url).hostname  # not the URL: its path or query may hold a token
        log.info("webhook %s created for %s (%s)", endpoint.id, host, ",".join(events))
        return endpoint, secret

    def remove(self, endpoint_id: str) -> None:
        """Delete an endpoint and its deliveries."""
        with self._db(write=True) as db:
            if db.execute("DELETE FROM endpoints WHERE id = ?", (endpoint_id,)).rowcount != 1:
                raise _unknown(endpoint_id)
            db.execute("DELETE FROM deliveries WHERE endpoint_id = ?", (endpoint_id,))
        log.info("webhook %s removed", endpoint_id)

    def resume(self, endpoint_id: str) -> Endpoint:
        """Make a paused endpoint active again; its pending deliveries are due now."""
        now = time.time()
        with self._db(write=True) as db:
            found = db.execute(
                "UPDATE endpoints SET state = 'active', failures = 0, paused_at = NULL "
                "WHERE id = ?",
                (endpoint_id,),
            ).rowcount
            if found != 1:
                raise _unknown(endpoint_id)
            db.execute(
                "UPDATE deliveries SET next_attempt_at = ? "
                "WHERE endpoint_id = ? AND status = 'pending'",
                (now, endpoint_id),
            )
        log.info("webhook %s resumed", endpoint_id)
        return self.get(endpoint_id)

    def list(self) -> list[Endpoint]:
        with self._db() as db:
            rows = db.execute(
                f"SELECT {ENDPOINT_COLUMNS}, (SELECT count(*) FROM deliveries d WHERE "
                "d.endpoint_id = endpoints.id AND d.status = 'pending') "
                "FROM endpoints ORDER BY created_at"
            ).fetchall()
        return [_endpoint(row) for row in rows]

    def get(self, endpoint_id: str) -> Endpoint:
        for endpoint in self.list():
            if endpoint.id == endpoint_id:
                return endpoint
        raise _unknown(endpoint_id)

    def deliveries(self, endpoint_id: str, limit: int = 100) -> list[Delivery]:
        """The endpoint's latest deliveries, newest first."""
        self.get(endpoint_id)
        with self._db() as db:
            rows = db.execute(
                f"SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE d.endpoint_id = ? "
                "ORDER BY d.created_at DESC, d.id LIMIT ?",
                (endpoint_id, limit),
            ).fetchall()
        return [Delivery(*row) for row in rows]

    def paused(self) -> int:
        with self._db() as db:
            return db.execute("SELECT count(*) FROM endpoints WHERE state = 'paused'").fetchone()[0]

    # -- the queue ---------------------------------------------------------------------

    def emit(self, event: Event) -> int:
        """Queue ``event`` for every endpoint that wants it; return how many were queued."""
        body = event.body()
        if len(body) > MAX_BODY:
            log.error("webhook event %s not queued: %d bytes > %d", event.id, len(body), MAX_BODY)
            return 0
        now, queued = time.time(), 0
        with self._db(write=True) as db:
            rows = db.execute(
                f"SELECT {ENDPOINT_COLUMNS}, (SELECT count(*) FROM deliveries d WHERE "
                "d.endpoint_id = endpoints.id AND d.status = 'pending') FROM endpoints"
            ).fetchall()
            for endpoint in map(_endpoint, rows):
                if not endpoint.wants(event):
                    continue
                if endpoint.pending >= self.max_pending:
                    log.error(
                        "webhook %s: %d deliveries pending; event %s not queued",
                        endpoint.id,
                        endpoint.pending,
                        event.id,
                    )
                    continue
                queued += db.execute(
                    "INSERT OR IGNORE INTO deliveries VALUES "
                    "(?, ?, ?, ?, ?, 0, ?, 'pending', NULL, NULL, NULL, ?, NULL)",
                    (
                        "dl_" + secrets.token_hex(8),
                        event.id,
                        endpoint.id,
                        event.kind,
                        body,
                        now,
                        now,
                    ),
                ).rowcount
        return queued

    def claim(self, now: float, lease: float, limit: int = 50) -> list[Due]:
        """The due deliveries of active endpoints, leased for ``lease`` seconds (another
        dispatcher skips them; a crashed one's come due again when the lease ends)."""
        with self._db(write=True) as db:
            rows = db.execute(
                f"SELECT {DELIVERY_COLUMNS}, e.url, e.secret FROM deliveries d "
                "JOIN endpoints e ON e.id = d.endpoint_id "
                "WHERE d.status = 'pending' AND d.next_attempt_at <= ? AND e.state = 'active' "
                "ORDER BY d.next_attempt_at LIMIT ?",
                (now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE deliveries SET next_attempt_at = ? WHERE id = ?",
                [(now + lease, row[0]) for row in rows],
            )
        return [Due(Delivery(*row[:13]), row[13], row[14]) for row in rows]

    def delivered(self, delivery: Delivery, status: int, latency: float) -> None:
        with self._db(write=True) as db:
            db.execute(
                "UPDATE deliveries SET status = 'delivered', attempts = attempts + 1, "
                "last_status = ?, last_error = NULL, latency = ?, done_at = ? WHERE id = ?",
                (status, latency, time.time(), delivery.id),
            )
            db.execute("UPDATE endpoints SET failures = 0 WHERE id = ?", (delivery.endpoint_id,))

    def failed(
        self,
        delivery: Delivery,
        status: int | None,
        error: str,
        latency: float | None,
        retry_at: float | None,
        pause_after: int,
    ) -> bool:
        """Record a failed attempt: tried again at ``retry_at`` (None: given up). Return
        True when this failure paused the endpoint (``pause_after`` in a row)."""
        with self._db(write=True) as db:
            db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_status = ?, last_error = ?, "
                "latency = ?, status = ?, next_attempt_at = ?, done_at = ? WHERE id = ?",
                (
                    status,
                    error[:500],
                    latency,
                    "pending" if retry_at is not None else "failed",
                    retry_at if retry_at is not None else delivery.next_attempt_at,
                    None if retry_at is not None else time.time(),
                    delivery.id,
                ),
            )
            failures, state = db.execute(
                "SELECT failures + 1, state FROM endpoints WHERE id = ?", (delivery.endpoint_id,)
            ).fetchone() or (0, "removed")
            pausing = state == "active" and failures >= pause_after
            db.execute(
                "UPDATE endpoints SET failures = ?, state = ?, paused_at = ? WHERE id = ? "
                "AND state != 'paused'",
                (
                    failures,
                    "paused" if pausing else state,
                    time.time() if pausing else None,
                    delivery.endpoint_id,
                ),
            )
        return pausing

    def prune(self, before: float) -> int:
        """Forget finished deliveries older than ``before``."""
        with self._db(write=True) as db:
            return db.execute(
                "DELETE FROM deliveries WHERE status != 'pending' AND done_at < ?", (before,)
            ).rowcount


def check_events(events: Iterable[str]) -> tuple[str, ...]:
    found = tuple(dict.fromkeys(e.strip() for e in events if e.strip()))
    unknown = [e for e in found if e not in EVENTS]
    if not found or unknown:
        raise WebhookError(
            f"events: one or more of {', '.join(EVENTS)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else ""),
            code="bad_events",
        )
    return found


def check_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    found = tuple(patterns)
    if not 0 < len(found) <= MAX_PATTERNS:
        raise WebhookError(f"1..{MAX_PATTERNS} sensor patterns ('*' for all)", code="bad_sensors")
    for pattern in found:
        if not isinstance(pattern, str) or not 0 < len(pattern) <= MAX_PATTERN:
            raise WebhookError(
                f"a sensor pattern has 1..{MAX_PATTERN} characters", code="bad_sensors"
            )
        if not pattern.isprintable():
            raise WebhookError("a sensor pattern has no control characters", code="bad_sensors")
    return found


def _endpoint(row: tuple) -> Endpoint:
    return Endpoint(
        row[0],
        row[1],
        tuple(row[2].split(",")),
        tuple(orjson.loads(row[3])),
        row[4],
        row[5],
        row[6],
        row[7],
        row[8],
    )


def _unknown(endpoint_id: str) -> WebhookError:
    return WebhookError(f"no webhook {endpoint_id!r}", code="not_found")

"""The audit log: who changed what (keys, model stages) and who asked what (analyst SQL,
exports), append-only in ``forecast.audit_log``.

``record(store, AuditEvent(...))`` is the one call that writes a row; ``read`` lists rows
newest first. A row never holds a secret: ``detail`` is scrubbed of API keys, process
tokens and JWTs and cut to :data:`MAX_DETAIL` characters (SQL text included). The table
is a plain MergeTree: nothing updates or deletes its rows, and analysts' SQL cannot read
it (it is not among the analyst tables of :mod:`sinks.query`).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson

from forecast.metrics import AUDIT_FAILURES, AUDIT_RECORDS
from sinks.clickhouse import Store
from sinks.schema import DATABASE

log = logging.getLogger(__name__)

TABLE = "audit_log"
COLUMNS = ["at", "actor", "role", "action", "target", "result", "request_id", "detail"]
MAX_DETAIL = 2000
MAX_FIELD = 200
MAX_LIMIT = 1000
MAX_SQL = 1000
"""SQL text is kept up to this many characters."""
SECRETS = (
    (re.compile(r"\b(fk_[0-9A-Za-z]{1,16})_[0-9A-Za-z_-]+"), r"\1_***"),
    (re.compile(r"\bfp_[0-9A-Za-z_-]+"), "fp_***"),
    (re.compile(r"\beyJ[0-9A-Za-z_-]*\.[0-9A-Za-z_-]+\.[0-9A-Za-z_-]*"), "<jwt>"),
    (re.compile(r"(?i)\b(bearer)\s+\S+"), r"\1 ***"),
)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited act: ``result`` is ``ok`` or the error code it ended with."""

    actor: str
    role: str
    action: str
    target: str = ""
    result: str = "ok"
    request_id: str = ""
    detail: dict = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def row(self) -> list:
        detail = scrub(orjson.dumps(self.detail, default=str).decode())
        return [
            datetime.fromtimestamp(self.at, UTC),
            *(
                scrub(str(v))[:MAX_FIELD]
                for v in (self.actor, self.role, self.action, self.target, self.result)
            ),
            self.request_id[:MAX_FIELD],
            detail if len(detail) <= MAX_DETAIL else detail[: MAX_DETAIL - 1] + "…",
        ]


def scrub(text: str) -> str:
    """``text`` with API key secrets, process tokens, JWTs and bearer values masked."""
    for pattern, replacement in SECRETS:
        text = pattern.sub(replacement, text)
    return text


def sql_detail(sql: str) -> dict[str, object]:
    """SQL for a record's detail, cut to MAX_SQL characters."""
    if len(sql) <= MAX_SQL:
        return {"sql": sql}
    return {"sql": sql[:MAX_SQL], "sql_chars": len(sql)}


def record(store: Store, event: AuditEvent) -> bool:
    """Append ``event``; a failure is logged and counted, never raised (False)."""
    try:
        store.insert(TABLE, [event.row()], COLUMNS, column_oriented=False)
    except Exception as exc:  # a closed or broken client raises more than StoreError
        AUDIT_FAILURES.inc()
        log.error(
            "audit record %s %s by %s not written: %s", event.action, event.target, event.actor, exc
        )
        return False
    AUDIT_RECORDS.labels(event.action, "ok" if event.result == "ok" else "error").inc()
    return True


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which rows ``read`` returns: times in epoch seconds, ``action`` exact or a prefix
    ending in ``.`` (``keys.``), newest first, at most ``limit`` (capped at MAX_LIMIT)."""

    since: float | None = None
    until: float | None = None
    actor: str | None = None
    action: str | None = None
    limit: int = 100


def read(store: Store, wanted: AuditFilter) -> list[dict]:
    where, params = ["1"], {"limit": max(1, min(wanted.limit, MAX_LIMIT))}
    if wanted.since is not None:
        where.append("at >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')")
        params["since"] = int(wanted.since * 1000)
    if wanted.until is not None:
        where.append("at < fromUnixTimestamp64Milli({until:Int64}, 'UTC')")
        params["until"] = int(wanted.until * 1000)
    if wanted.actor:
        where.append("actor = {actor:String}")
        params["actor"] = wanted.actor
    if wanted.action and wanted.action.endswith("."):
        where.append("startsWith(action, {action:String})")
        params["action"] = wanted.action
    elif wanted.action:
        where.append("action = {action:String}")
        params["action"] = wanted.action
    rows = store.query(
        f"SELECT {', '.join(COLUMNS)} FROM {DATABASE}.{TABLE} WHERE {' AND '.join(where)} "
        "ORDER BY at DESC LIMIT {limit:UInt32}",
        params,
        settings={"final": 0},
    )
    out = []
    for row in rows:
        doc = dict(zip(COLUMNS, row, strict=True))
        doc["at"] = doc["at"].timestamp()
        doc["detail"] = _detail(doc["detail"])
        out.append(doc)
    return out


def _detail(text: str) -> dict:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:  # cut at MAX_DETAIL
        return {"truncated": text}
    return value if isinstance(value, dict) else {"value": value}

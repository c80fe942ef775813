"""The audit log over HTTP, and how a route gets audited.

``GET /v1/audit`` lists records newest first (admin). ``POST /v1/audit/local`` takes a
record from the local CLI through the process that owns the embedded store (only with
that process's own token, or with auth off).

A route is audited when its router has ``route_class=AuditedRoute`` and its function is
marked ``@audited("keys.revoke", target="key_id")``: every answer it gives, refusals by
the role checks included, leaves one record with the caller (key id or ``jwt:<sub>``),
its role, the request id, the result (``ok`` or the error code) and what the route adds
with ``note(request, target=..., **detail)``. Code that is not a route calls
``record_request``. Records are written in a worker thread once the act is done; one
that cannot be written is logged and counted (``forecast_audit_failures``) and the act
stands: it has happened by then, and its caller must not be told otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, StrictStr
from starlette.exceptions import HTTPException
from starlette.responses import Response

from forecast import logs
from forecast.errors import AuthError, ForecastError
from forecast.metrics import AUDIT_FAILURES
from forecast.schemas import iso
from gateway.api.context import Context, credentials, need
from gateway.api.errors import STARLETTE_CODES, error, responses
from gateway.api.schemas import JsonBody, Time
from gateway.auth import Principal
from sinks.audit import MAX_LIMIT, AuditEvent, AuditFilter, read, record

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
ACTOR_HEADER = "X-Forecast-Actor"
LOCAL_ACTOR = re.compile(r"^cli:[A-Za-z0-9._@-]{1,64}$")


# -- auditing routes ---------------------------------------------------------------------


def audited(action: str, target: str | None = None) -> Callable[[F], F]:
    """Mark a route function: ``action`` names the act, ``target`` the path or query
    parameter that names its object, or a format of them (``{name} v{version}``); the
    route may ``note`` a better one."""

    def mark(fn: F) -> F:
        fn.__audit__ = (action, target)  # type: ignore[attr-defined]
        return fn

    return mark


def note(request: Request, target: str | None = None, **detail: Any) -> None:
    """What the audit record of this request says about its object; call it early, so
    a refusal that follows is recorded with it."""
    found = getattr(request.state, "audit", None)
    if found is None:
        found = request.state.audit = {"detail": {}}
    if target is not None:
        found["target"] = target
    found["detail"].update(detail)


class AuditedRoute(APIRoute):
    """An APIRoute that records each answer of a route marked ``@audited``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        mark = getattr(self.endpoint, "__audit__", None)
        if mark is None:
            return handler
        action, param = mark

        async def audited_handler(request: Request) -> Response:
            target = None if param is None else _target(param, request)
            try:
                response = await handler(request)
            except Exception as exc:
                await record_request(request, action, target, error_code(exc))
                raise
            await record_request(request, action, target, _result(response))
            return response

        return audited_handler


def _target(param: str, request: Request) -> str | None:
    """A parameter's value, or ``param`` formatted with them (``{name} v{version}``)."""
    values = {**request.query_params, **request.path_params}
    if "{" not in param:
        return values.get(param)
    try:
        return param.format(**values)
    except (KeyError, IndexError, ValueError):
        return None


def error_code(exc: BaseException) -> str:
    """The code an error answer carries for ``exc``."""
    if isinstance(exc, ForecastError):
        return exc.code
    if isinstance(exc, RequestValidationError):
        return "bad_request"
    if isinstance(exc, HTTPException):
        return getattr(exc, "code", None) or STARLETTE_CODES.get(exc.status_code, "http_error")
    return "internal_error"


def _result(response: Response) -> str:
    if response.status_code < 400:
        return "ok"
    try:
        return str(orjson.loads(response.body)["error"]["code"])
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return f"http_{response.status_code}"


async def record_request(
    request: Request,
    action: str,
    target: str | None = None,
    result: str = "ok",
    detail: dict[str, Any] | None = None,
) -> bool:
    """Record an act of this request's caller (who, role and request id from the
    request); False, logged and counted, when it could not be written."""
    noted = getattr(request.state, "audit", {"detail": {}})
    actor, role = _who(request)
    event = AuditEvent(
        actor=actor,
        role=role,
        action=action,
        target=str(noted.get("target", target) or ""),
        result=result,
        request_id=logs.REQUEST_ID.get() or "",
        detail={**noted["detail"], **(detail or {})},
    )
    return await write(request.app.state.ctx.store, event)


async def write(store: Any, event: AuditEvent) -> bool:
    """``event`` into ``store`` off the event loop; no store: logged and counted."""
    if store is None:
        AUDIT_FAILURES.inc()
        log.error(
            "audit record %s %s by %s not written: this process serves no store",
            event.action,
            event.target,
            event.actor,
        )
        return False
    return await asyncio.to_thread(record, store, event)


def _who(request: Request) -> tuple[str, str]:
    """The caller's id and role; the local CLI's user through the owner's own token."""
    who: Principal | None = getattr(request.state, "principal", None)
    if who is None:
        return "unauthenticated", "none"
    actor = request.headers.get(ACTOR_HEADER, "")
    if _is_local(request, who) and LOCAL_ACTOR.match(actor):
        return actor, "local"
    return who.key_id, who.role


def _is_local(request: Request, who: Principal) -> bool:
    """The token of this process itself (the CLI reads it from the 0600 owner file)."""
    if not request.app.state.ctx.auth.enabled:
        return True
    return who.key_id.startswith("process-") and who.can("analyst")


# -- routes ------------------------------------------------------------------------------

router = APIRouter(prefix="/audit", tags=["audit"])


class AuditRecord(BaseModel):
    at: str = Field(description="RFC 3339 UTC")
    actor: str = Field(description="key id, `jwt:<sub>`, `cli:<os user>` or `unauthenticated`")
    role: str = Field(description="the caller's role; `local` for the CLI")
    action: str = Field(description="e.g. `keys.create`, `models.promote`, `query`")
    target: str
    result: str = Field(description="`ok` or the error code")
    request_id: str
    detail: dict[str, Any]


class AuditLog(BaseModel):
    records: list[AuditRecord]


class LocalRecord(JsonBody):
    actor: StrictStr = Field(pattern=LOCAL_ACTOR.pattern)
    action: StrictStr = Field(min_length=1, max_length=64)
    target: StrictStr = Field("", max_length=200)
    result: StrictStr = Field("ok", min_length=1, max_length=64)
    detail: dict[str, Any] = Field(default_factory=dict)


def auditor(
    request: Request, ctx: Context, token: Annotated[str | None, Depends(credentials)]
) -> Principal:
    """An admin, or the local command line through this process's own token."""
    who = ctx.auth.authenticate(token)
    if not (who.can("admin") or _is_local(request, who)):
        raise AuthError(f"the {who.role} role may not do this; needs admin", code="forbidden")
    return who


@router.get(
    "",
    summary="Audit records, newest first (admin)",
    dependencies=[Depends(auditor)],
    responses=responses(400, 503),
)
def list_audit(
    ctx: Context,
    since: Annotated[Time, Query(description="at or after")] = None,
    until: Annotated[Time, Query(description="before")] = None,
    actor: Annotated[str | None, Query(max_length=200)] = None,
    action: Annotated[
        str | None, Query(max_length=64, description="exact, or a prefix ending in `.`")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> AuditLog:
    wanted = AuditFilter(
        since=None if since is None else since.timestamp(),
        until=None if until is None else until.timestamp(),
        actor=actor,
        action=action,
        limit=limit,
    )
    rows = read(need(ctx.store, "the store"), wanted)
    return AuditLog(records=[AuditRecord(**{**row, "at": iso(row["at"])}) for row in rows])


def local_caller(
    request: Request, ctx: Context, token: Annotated[str | None, Depends(credentials)]
) -> Principal:
    """The caller, when it holds this process's own token (or auth is off)."""
    who = ctx.auth.authenticate(token)
    if not _is_local(request, who):
        raise AuthError("only the local command line records here", code="forbidden")
    return who


@router.post(
    "/local",
    summary="Record an act of the local command line (this process's own token only)",
    status_code=204,
    dependencies=[Depends(local_caller)],
    responses=responses(400, 503),
)
async def record_local(ctx: Context, body: LocalRecord) -> Response:
    event = AuditEvent(
        actor=body.actor,
        role="local",
        action=body.action,
        target=body.target,
        result=body.result,
        request_id=logs.REQUEST_ID.get() or "",
        detail=body.detail,
    )
    if not await write(need(ctx.store, "the store"), event):
        return error(503, "audit_failed", "the audit record was not written", {"Retry-After": "5"})
    return Response(status_code=204)

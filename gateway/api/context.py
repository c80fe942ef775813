"""What the routes reach: the ``ApiContext`` (on ``app.state``) and the caller.

The caller is a sync dependency, so FastAPI runs it in its threadpool: the key store's
SQLite lookup never blocks the event loop. ``Viewer``, ``Analyst``, ``Operator`` and
``Admin`` are route parameters that authenticate and require at least that role
(``viewer`` ... ``admin`` the same as dependencies, for routes that need no caller).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer

from forecast.errors import AuthError, StoreError
from gateway.auth import ROLES, Authenticator, Principal, bearer
from gateway.forecasts import OnDemand
from gateway.hub import Hub
from models.registry import Registry
from sinks.clickhouse import Store
from sinks.query import QueryLimits
from sinks.webhooks import WebhookStore

T = TypeVar("T")


@dataclass
class ApiContext:
    """The parts this process serves; a part left None answers 503."""

    auth: Authenticator
    hub: Hub | None = None
    store: Store | None = None
    registry: Registry | None = None
    checks: dict[str, Callable[[], Awaitable[bool]]] = field(default_factory=dict)
    limits: QueryLimits = field(default_factory=QueryLimits)
    export_max_rows: int = 2_000_000
    export_timeout: float = 300.0
    webhooks: WebhookStore | None = None
    ondemand: OnDemand | None = None  # POST /v1/forecast; made from registry and store if None


async def context(request: Request) -> ApiContext:
    return request.app.state.ctx


Context = Annotated[ApiContext, Depends(context)]


def need(part: T | None, what: str) -> T:
    """``part``, or a StoreError (503) naming ``what`` when this process does not serve it."""
    if part is None:
        raise StoreError(f"{what} is not served by this process")
    return part


HEADER = HTTPBearer(
    scheme_name="bearer",
    description="an API key (`fk_...`) or a JWT",
    auto_error=False,
)
QUERY = APIKeyQuery(
    name="token",
    scheme_name="token",
    description="the same credentials in the query (browsers cannot set headers)",
    auto_error=False,
)


async def credentials(
    request: Request,
    _header: Annotated[HTTPAuthorizationCredentials | None, Security(HEADER)],
    _query: Annotated[str | None, Security(QUERY)],
) -> str | None:
    """The token from ``Authorization: Bearer``, else from ``?token=``."""
    return bearer(request.headers.get("authorization"), request.query_params.get("token"))


def _caller(role: str) -> Callable[..., Principal]:
    def caller(
        request: Request, ctx: Context, token: Annotated[str | None, Depends(credentials)]
    ) -> Principal:
        who = ctx.auth.authenticate(token)
        request.state.principal = who  # for the audit record, also of a refusal
        if not who.can(role):
            raise AuthError(f"the {who.role} role may not do this; needs {role}", code="forbidden")
        return who

    caller.__name__ = f"{role}_caller"
    return caller


viewer, analyst, operator, admin = (_caller(role) for role in ROLES)
Viewer = Annotated[Principal, Depends(viewer)]
Analyst = Annotated[Principal, Depends(analyst)]
Operator = Annotated[Principal, Depends(operator)]
Admin = Annotated[Principal, Depends(admin)]

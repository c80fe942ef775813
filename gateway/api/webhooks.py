"""Webhooks (admin): create (the signing secret is shown once), list, remove, resume, and
an endpoint's latest deliveries."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from gateway.api.audit import AuditedRoute, audited, note
from gateway.api.context import Context, admin, need
from gateway.api.errors import responses
from gateway.api.schemas import JsonBody
from sinks.webhook_targets import origin
from sinks.webhooks import Delivery, Endpoint, WebhookStore

router = APIRouter(
    prefix="/webhooks",
    tags=["webhooks"],
    dependencies=[Depends(admin)],
    route_class=AuditedRoute,
)

EventKind = Literal["drift", "decision", "alert"]
WebhookId = Annotated[str, Path(max_length=64)]


class WebhookRequest(JsonBody):
    model_config = ConfigDict(extra="forbid")

    url: StrictStr = Field(max_length=2048, description="http(s) URL of a public address")
    events: list[EventKind] = Field(min_length=1, max_length=3)
    sensors: list[Annotated[StrictStr, Field(min_length=1, max_length=200)]] = Field(
        ["*"], min_length=1, max_length=50, description="sensor patterns (`*`, `?`)"
    )
    secret: Annotated[StrictStr, Field(min_length=16, max_length=256)] | None = Field(
        None, description="the signing secret; generated when absent"
    )


class Webhook(BaseModel):
    id: str
    url: str
    events: list[str]
    sensors: list[str]
    state: Literal["active", "paused"]
    failures: int = Field(description="failed attempts in a row")
    paused_at: float | None
    created_at: float
    pending: int = Field(description="deliveries waiting")

    @classmethod
    def of(cls, endpoint: Endpoint) -> Webhook:
        return cls(
            id=endpoint.id,
            url=endpoint.url,
            events=list(endpoint.events),
            sensors=list(endpoint.sensors),
            state=endpoint.state,  # type: ignore[arg-type]
            failures=endpoint.failures,
            paused_at=endpoint.paused_at,
            created_at=endpoint.created_at,
            pending=endpoint.pending,
        )


class WebhookCreated(Webhook):
    secret: str = Field(description="shown only now: verify X-Forecast-Signature with it")


class Webhooks(BaseModel):
    webhooks: list[Webhook]


class Removed(BaseModel):
    id: str
    removed: bool = True


class DeliveryInfo(BaseModel):
    id: str
    event_id: str
    event: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: float | None
    last_status: int | None
    last_error: str | None
    latency: float | None = Field(description="seconds of the latest attempt")
    created_at: float
    done_at: float | None

    @classmethod
    def of(cls, d: Delivery) -> DeliveryInfo:
        return cls(
            id=d.id,
            event_id=d.event_id,
            event=d.event,
            status=d.status,  # type: ignore[arg-type]
            attempts=d.attempts,
            next_attempt_at=d.next_attempt_at if d.status == "pending" else None,
            last_status=d.last_status,
            last_error=d.last_error,
            latency=d.latency,
            created_at=d.created_at,
            done_at=d.done_at,
        )


class Deliveries(BaseModel):
    deliveries: list[DeliveryInfo]


def _store(ctx: Context) -> WebhookStore:
    return need(ctx.webhooks, "webhooks")


@router.post(
    "",
    summary="Create a webhook; its signing secret is shown once (admin)",
    status_code=201,
    responses=responses(400, 409, 503),
)
@audited("webhooks.add")
def create_webhook(request: Request, ctx: Context, body: WebhookRequest) -> WebhookCreated:
    note(request, url=origin(body.url), events=list(body.events), sensors=list(body.sensors))
    endpoint, secret = _store(ctx).create(body.url, body.events, body.sensors, body.secret)
    note(request, target=endpoint.id)
    return WebhookCreated(**Webhook.of(endpoint).model_dump(), secret=secret)


@router.get("", summary="Webhooks, without their secrets (admin)", responses=responses(503))
def list_webhooks(ctx: Context) -> Webhooks:
    return Webhooks(webhooks=[Webhook.of(e) for e in _store(ctx).list()])


@router.delete("/{webhook_id}", summary="Remove a webhook (admin)", responses=responses(404, 503))
@audited("webhooks.remove", target="webhook_id")
def remove_webhook(ctx: Context, webhook_id: WebhookId) -> Removed:
    _store(ctx).remove(webhook_id)
    return Removed(id=webhook_id)


@router.post(
    "/{webhook_id}/resume",
    summary="Resume a paused webhook (admin)",
    responses=responses(404, 503),
)
@audited("webhooks.resume", target="webhook_id")
def resume_webhook(ctx: Context, webhook_id: WebhookId) -> Webhook:
    return Webhook.of(_store(ctx).resume(webhook_id))


@router.get(
    "/{webhook_id}/deliveries",
    summary="A webhook's latest deliveries, newest first (admin)",
    responses=responses(404, 503),
)
def list_deliveries(
    ctx: Context, webhook_id: WebhookId, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> Deliveries:
    found = _store(ctx).deliveries(webhook_id, limit)
    return Deliveries(deliveries=[DeliveryInfo.of(d) for d in found])

"""API keys (admin): list, create (the token is shown once), revoke."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from starlette.responses import Response

from gateway.api.audit import AuditedRoute, audited, note
from gateway.api.context import Context, admin
from gateway.api.errors import error, responses
from gateway.api.schemas import ApiKey, KeyCreated, KeyRequest, Keys, Revoked

router = APIRouter(
    prefix="/keys", tags=["keys"], dependencies=[Depends(admin)], route_class=AuditedRoute
)


@router.get("", summary="API keys (admin)")
def list_keys(ctx: Context) -> Keys:
    return Keys(keys=[ApiKey.model_validate(asdict(k)) for k in ctx.auth.keys.list()])


@router.post("", summary="Create a key; its token is shown once (admin)", responses=responses(400))
@audited("keys.create")
def create_key(request: Request, ctx: Context, body: KeyRequest) -> KeyCreated:
    note(request, role=body.role, name=body.name, scopes=list(body.scopes))
    key_id, token = ctx.auth.keys.create(body.role, body.name, body.scopes)
    note(request, target=key_id)
    return KeyCreated(key_id=key_id, token=token)


@router.delete(
    "/{key_id}",
    summary="Revoke a key (admin)",
    response_model=Revoked,
    responses=responses(404),
)
@audited("keys.revoke", target="key_id")
def revoke_key(
    ctx: Context, key_id: Annotated[str, Path(json_schema_extra={"maxLength": 64})]
) -> Revoked | Response:
    if not ctx.auth.keys.revoke(key_id):
        return error(404, "not_found", f"no active key {key_id!r}")
    return Revoked(key_id=key_id)

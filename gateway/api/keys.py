"""API keys (admin): list, create (the token is shown once), revoke."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from starlette.responses import Response

from gateway.api.context import Context, admin
from gateway.api.errors import error, responses
from gateway.api.schemas import ApiKey, KeyCreated, KeyRequest, Keys, Revoked

router = APIRouter(prefix="/keys", tags=["keys"], dependencies=[Depends(admin)])


@router.get("", summary="API keys (admin)")
def list_keys(ctx: Context) -> Keys:
    return Keys(keys=[ApiKey.model_validate(asdict(k)) for k in ctx.auth.keys.list()])


@router.post("", summary="Create a key; its token is shown once (admin)", responses=responses(400))
def create_key(ctx: Context, body: KeyRequest) -> KeyCreated:
    key_id, token = ctx.auth.keys.create(body.role, body.name, body.scopes)
    return KeyCreated(key_id=key_id, token=token)


@router.delete(
    "/{key_id}",
    summary="Revoke a key (admin)",
    response_model=Revoked,
    responses=responses(404),
)
def revoke_key(
    ctx: Context, key_id: Annotated[str, Path(json_schema_extra={"maxLength": 64})]
) -> Revoked | Response:
    if not ctx.auth.keys.revoke(key_id):
        return error(404, "not_found", f"no active key {key_id!r}")
    return Revoked(key_id=key_id)

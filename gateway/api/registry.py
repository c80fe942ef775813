"""The model registry (versions, promotion, rollback, importances) and the retraining
loop's decisions."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from forecast.schemas import iso
from gateway.api.audit import AuditedRoute, audited, note
from gateway.api.context import Context, need, operator, viewer
from gateway.api.errors import error, responses
from gateway.api.schemas import Decision, Decisions, Importances, Models, Stage, StageRef
from sinks.schema import DATABASE

router = APIRouter(tags=["models"], route_class=AuditedRoute)
Name = Annotated[str, Path(json_schema_extra={"pattern": r"^[A-Za-z0-9_-]{1,64}$"})]
Version = Annotated[int, Path(json_schema_extra={"minimum": 1})]
StageQuery = Annotated[Stage, Query(description="the stage to change")]


@router.get(
    "/models",
    summary="Registered model versions and stages",
    dependencies=[Depends(viewer)],
    responses=responses(503),
)
def list_models(ctx: Context) -> Models:
    return Models.model_validate({"models": need(ctx.registry, "the model registry").versions()})


@router.post(
    "/models/rollback",
    summary="Return a stage to its previous version (operator)",
    dependencies=[Depends(operator)],
    responses=responses(400, 409, 503),
)
@audited("models.rollback", target="stage")
def rollback(request: Request, ctx: Context, stage: StageQuery = "production") -> StageRef:
    note(request, target=stage)
    ref = need(ctx.registry, "the model registry").rollback(stage)
    note(request, name=ref.name, version=ref.version)
    return StageRef(name=ref.name, version=ref.version, stage=stage)


@router.post(
    "/models/{name}/{version}/promote",
    summary="Promote a version (operator)",
    dependencies=[Depends(operator)],
    responses=responses(400, 404, 409, 503),
)
@audited("models.promote", target="{name} v{version}")
def promote(
    request: Request, ctx: Context, name: Name, version: Version, stage: StageQuery = "production"
) -> StageRef:
    note(request, stage=stage)
    need(ctx.registry, "the model registry").promote(name, version, stage)
    return StageRef(name=name, version=version, stage=stage)


@router.get(
    "/models/{name}/{version}/importances",
    summary="Variable importances of a TFT version (encoder and decoder)",
    dependencies=[Depends(viewer)],
    response_model=Importances,
    responses=responses(400, 404, 503),
)
def importances(ctx: Context, name: Name, version: Version) -> Importances | Response:
    meta = need(ctx.registry, "the model registry").meta(name, version)
    if "importances" not in meta:
        return error(404, "no_importances", f"{name} v{version} ({meta['kind']}) has none")
    return Importances.model_validate({"name": name, "version": version, **meta["importances"]})


@router.get(
    "/decisions",
    summary="Steps of the drift-to-retrain loop, newest first",
    dependencies=[Depends(viewer)],
    responses=responses(400, 503),
)
def decisions(ctx: Context, limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> Decisions:
    rows = need(ctx.store, "the store").query(
        f"SELECT at, action, model, model_version, detail FROM {DATABASE}.model_decisions "
        "ORDER BY at DESC LIMIT {limit:UInt32}",
        {"limit": limit},
    )
    return Decisions(
        decisions=[
            Decision(
                at=iso(at.timestamp()),
                action=action,
                model=model,
                model_version=version,
                detail=orjson.loads(detail),
            )
            for at, action, model, version, detail in rows
        ]
    )

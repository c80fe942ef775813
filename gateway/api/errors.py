"""Errors as JSON ``{"error": {"code", "message"}}``: the exception handlers, and the
error responses the OpenAPI document lists.

FastAPI's own validation errors (422) are answered 400 ``bad_request`` with a message
naming the field, and the document says 400 where FastAPI would say 422.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from forecast.errors import (
    AuthError,
    ForecastError,
    ForecastRequestError,
    ModelError,
    QueryError,
    StoreError,
    WebhookError,
)
from gateway.api.schemas import Error

GUARDED = (401, 403, 408, 413, 429)  # every /v1/ route: credentials, request limits, rate
RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
DESCRIPTIONS = {
    400: "bad request (the message names the field)",
    401: "missing, unknown, revoked or expired credentials",
    403: "the caller's role may not do this",
    404: "not found (or not in the caller's scope)",
    408: "the request body did not arrive in time",
    409: "conflict with the registry's state",
    413: "the request body is over the cap",
    429: "rate limited",
    503: "a part is not served by this process or not ready",
}


def error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI error responses for ``statuses``, each with the Error body."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": Error, "description": DESCRIPTIONS[status]}
        if status in (429, 503):
            out[status]["headers"] = RETRY_AFTER
    return out


async def on_forecast_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ForecastError):
        raise TypeError(f"not a ForecastError: {exc!r}")
    if isinstance(exc, AuthError):
        status = {"forbidden": 403, "bad_request": 400, "bad_scope": 400}.get(exc.code, 401)
        return error(status, exc.code, exc.message)
    if isinstance(exc, ModelError):
        status = 404 if exc.message.startswith("no model") else 409
        if exc.message.startswith("unknown stage"):
            status = 400
        return error(status, exc.code, exc.message)
    if isinstance(exc, QueryError):
        return error(400, exc.code, exc.message)
    if isinstance(exc, ForecastRequestError):
        status = REQUEST_STATUS.get(exc.code, 400)
        return error(status, exc.code, exc.message)
    if isinstance(exc, WebhookError):
        status = {"not_found": 404, "too_many": 409}.get(exc.code, 400)
        return error(status, exc.code, exc.message)
    if isinstance(exc, StoreError):
        return error(503, exc.code, exc.message, {"Retry-After": "5"})
    return error(500, exc.code, exc.message)


REQUEST_STATUS = {
    "unknown_sensor": 404,
    "unknown_model": 404,
    "out_of_scope": 403,
    "too_large": 413,
}
STARLETTE_CODES = {404: "not_found", 405: "method_not_allowed"}


async def on_http_error(request: Request, exc: Exception) -> Response:
    """Starlette's 404 and 405, and the body guards' 408 and 413 (which carry a code)."""
    if not isinstance(exc, HTTPException):
        raise TypeError(f"not an HTTPException: {exc!r}")
    code = getattr(exc, "code", None) or STARLETTE_CODES.get(exc.status_code, "http_error")
    return error(exc.status_code, code, str(exc.detail), exc.headers)


async def on_invalid(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, RequestValidationError):
        raise TypeError(f"not a RequestValidationError: {exc!r}")
    return error(400, "bad_request", describe(exc.errors()))


def describe(errors: Sequence[Any]) -> str:
    """``limit: Input should be less than or equal to 10000`` (the first three errors)."""
    parts = []
    for found in errors[:3]:
        loc = [str(part) for part in found.get("loc", ())]
        if found.get("type") == "json_invalid":
            parts.append(f"body is not JSON: {found.get('ctx', {}).get('error', 'invalid')}")
            continue
        where = ".".join(loc[1:]) or (loc[0] if loc else "request")
        parts.append(f"{where}: {str(found.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return "; ".join(parts)


HANDLERS = {
    ForecastError: on_forecast_error,
    HTTPException: on_http_error,
    RequestValidationError: on_invalid,
}


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with FastAPI's 422 responses replaced by this API's 400."""
    bad_request = {
        "description": DESCRIPTIONS[400],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            answers = operation.get("responses", {})
            if answers.pop("422", None) is not None:
                answers.setdefault("400", bad_request)
    found = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        found.pop(name, None)
    return schema

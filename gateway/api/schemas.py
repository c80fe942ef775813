"""Request and response bodies of the HTTP API (pydantic), as the OpenAPI document shows them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic.json_schema import WithJsonSchema

from forecast.parsing import Invalid, parse_time

Role = Literal["viewer", "analyst", "operator", "admin"]
Stage = Literal["production", "shadow"]


def _utc(text: object) -> datetime | None:
    """An RFC 3339 time (UTC when it names no offset); empty means none."""
    if text is None or text == "":
        return None
    try:
        return datetime.fromtimestamp(parse_time(text), UTC)
    except Invalid as exc:
        raise ValueError(f"bad time {text!r}: {exc.detail}") from None


Time = Annotated[
    datetime | None,
    PlainValidator(_utc),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable, e.g. `unauthorized`, `bad_request`")
    message: str


class Error(BaseModel):
    """Every error answer: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    ready: bool
    checks: dict[str, bool] = Field(description="each check by name (broker, store, model, ...)")


class SensorSummary(BaseModel):
    sensor_id: str
    seq: int
    ts: str
    model: str


class Sensors(BaseModel):
    sensors: list[SensorSummary]


class Forecast(BaseModel):
    """A published prediction, exactly as on the `predictions` topic and the websocket."""

    type: Literal["prediction"] = "prediction"
    sensor_id: str
    ts: str = Field(description="time of the last reading used (RFC 3339)")
    issued_at: str
    model: str
    model_version: int
    step_seconds: float
    yhat: list[float]
    lower: list[float]
    upper: list[float]
    seq: int


class History(BaseModel):
    sensor_id: str
    forecasts: list[Forecast] = Field(description="newest first")


class JsonBody(BaseModel):
    """A JSON object body, also when sent under another Content-Type (``curl -d``)."""

    @model_validator(mode="before")
    @classmethod
    def _decode(cls, data: Any) -> Any:
        if isinstance(data, bytes | str):
            try:
                return orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"not JSON ({exc})") from None
        return data


class QueryRequest(JsonBody):
    sql: StrictStr = Field(description="one SELECT-family statement")
    max_rows: StrictInt | None = Field(
        None, ge=1, description="at most FORECAST_QUERY_MAX_ROWS (the default)"
    )


class QueryResult(BaseModel):
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool = Field(description="more rows matched than were returned")


class ModelVersion(BaseModel):
    """A registered version's metadata (training parameters, data, metrics, ...)."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: int
    stage: Literal["production", "shadow", "archived", "registered"]
    kind: str | None = None
    created_at: float | None = None


class Models(BaseModel):
    models: list[ModelVersion]


class StageRef(BaseModel):
    name: str
    version: int
    stage: Stage


class Importances(BaseModel):
    """Variable importances of a TFT version, each a share of its selection network."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: int
    encoder: dict[str, float]
    decoder: dict[str, float]


class Decision(BaseModel):
    at: str
    action: str
    model: str
    model_version: int
    detail: dict[str, Any]


class Decisions(BaseModel):
    decisions: list[Decision] = Field(description="newest first")


class KeyRequest(JsonBody):
    role: Role
    name: StrictStr = ""
    scopes: list[Annotated[StrictStr, Field(min_length=1)]] = Field(
        ["*"], description="sensor patterns (`*`, `?`), one per element, without commas"
    )


class ApiKey(BaseModel):
    key_id: str
    name: str
    role: str
    scopes: list[str]
    created_at: float
    revoked_at: float | None


class Keys(BaseModel):
    keys: list[ApiKey]


class KeyCreated(BaseModel):
    key_id: str
    token: str
    note: str = "the token is shown only now"


class Revoked(BaseModel):
    key_id: str
    revoked: bool = True

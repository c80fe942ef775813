"""The OpenAPI 3.1 description of the HTTP API, served at ``/openapi.json``."""

from __future__ import annotations

from forecast import __version__

ERROR = {"$ref": "#/components/schemas/Error"}
AUTH = [{"bearer": []}]


def _errors(*codes: int) -> dict:
    return {
        str(c): {"description": "error", "content": {"application/json": {"schema": ERROR}}}
        for c in codes
    }


def _json(schema: dict, description: str = "ok") -> dict:
    return {
        "200": {"description": description, "content": {"application/json": {"schema": schema}}}
    }


SENSOR = {
    "name": "sensor_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,200}$"},
}
TIME = {"type": "string", "format": "date-time"}
TIME_RANGE = [{"name": bound, "in": "query", "schema": TIME} for bound in ("from", "to")]
MODEL_VERSION = [
    {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
    },
    {
        "name": "version",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    },
]
STAGE = {"name": "stage", "in": "query", "schema": {"enum": ["production", "shadow"]}}
OBJECT = {"type": "object"}
GUARDED = (401, 403, 408, 413, 429)  # every /v1/ route: credentials, request limits, rate


def spec() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "forecast",
            "version": __version__,
            "description": "Live forecasts, their history, models, keys and SQL.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        }
                    },
                }
            },
        },
        "paths": {
            "/healthz": {"get": {"summary": "Alive", "responses": _json(OBJECT)}},
            "/readyz": {
                "get": {
                    "summary": "Broker, store and model ready",
                    "responses": {**_json(OBJECT), **_errors(503)},
                }
            },
            "/v1/sensors": {
                "get": {
                    "summary": "Sensors with a live forecast",
                    "security": AUTH,
                    "responses": {**_json(OBJECT), **_errors(*GUARDED, 503)},
                }
            },
            "/v1/sensors/{sensor_id}/forecast": {
                "get": {
                    "summary": "The latest forecast of a sensor",
                    "security": AUTH,
                    "parameters": [SENSOR],
                    "responses": {**_json(OBJECT), **_errors(*GUARDED, 404, 503)},
                }
            },
            "/v1/sensors/{sensor_id}/forecasts": {
                "get": {
                    "summary": "Forecast history of a sensor (published ones)",
                    "security": AUTH,
                    "parameters": [
                        SENSOR,
                        *TIME_RANGE,
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                        },
                    ],
                    "responses": {**_json(OBJECT), **_errors(400, *GUARDED, 503)},
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "Registered model versions and stages",
                    "security": AUTH,
                    "responses": {**_json(OBJECT), **_errors(*GUARDED)},
                }
            },
            "/v1/models/{name}/{version}/promote": {
                "post": {
                    "summary": "Promote a version (operator)",
                    "security": AUTH,
                    "parameters": [*MODEL_VERSION, STAGE],
                    "responses": {**_json(OBJECT), **_errors(400, *GUARDED, 404)},
                }
            },
            "/v1/models/{name}/{version}/importances": {
                "get": {
                    "summary": "Variable importances of a TFT version (encoder and decoder)",
                    "security": AUTH,
                    "parameters": MODEL_VERSION,
                    "responses": {**_json(OBJECT), **_errors(400, *GUARDED, 404)},
                }
            },
            "/v1/decisions": {
                "get": {
                    "summary": "Steps of the drift-to-retrain loop, newest first",
                    "security": AUTH,
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                        }
                    ],
                    "responses": {**_json(OBJECT), **_errors(400, *GUARDED, 503)},
                }
            },
            "/v1/models/rollback": {
                "post": {
                    "summary": "Return a stage to its previous version (operator)",
                    "security": AUTH,
                    "parameters": [STAGE],
                    "responses": {**_json(OBJECT), **_errors(400, *GUARDED, 409)},
                }
            },
            "/v1/keys": {
                "get": {
                    "summary": "API keys (admin)",
                    "security": AUTH,
                    "responses": {**_json(OBJECT), **_errors(*GUARDED)},
                },
                "post": {
                    "summary": "Create a key; its token is shown once (admin)",
                    "security": AUTH,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["role"],
                                    "properties": {
                                        "role": {
                                            "enum": ["viewer", "analyst", "operator", "admin"]
                                        },
                                        "name": {"type": "string", "maxLength": 200},
                                        "scopes": {
                                            "type": "array",
                                            "maxItems": 100,
                                            "items": {
                                                "type": "string",
                                                "minLength": 1,
                                                "maxLength": 200,
                                            },
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": {**_json(OBJECT), **_errors(400, *GUARDED)},
                },
            },
            "/v1/keys/{key_id}": {
                "delete": {
                    "summary": "Revoke a key (admin)",
                    "security": AUTH,
                    "parameters": [
                        {
                            "name": "key_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "maxLength": 64},
                        }
                    ],
                    "responses": {**_json(OBJECT), **_errors(*GUARDED, 404)},
                }
            },
            "/v1/query": {
                "post": {
                    "summary": "One SELECT or DESCRIBE, read-only, capped, scoped (analyst)",
                    "security": AUTH,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["sql"],
                                    "properties": {
                                        "sql": {"type": "string", "maxLength": 65536},
                                        "max_rows": {
                                            "type": "integer",
                                            "minimum": 1,
                                            "maximum": 10000,
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": {**_json(OBJECT), **_errors(400, *GUARDED, 503)},
                }
            },
            "/v1/export": {
                "get": {
                    "summary": "Predictions or errors as CSV, JSON lines or Parquet (analyst)",
                    "security": AUTH,
                    "parameters": [
                        {
                            "name": "what",
                            "in": "query",
                            "schema": {"enum": ["predictions", "errors"]},
                        },
                        {"name": "sensors", "in": "query", "schema": {"type": "string"}},
                        *TIME_RANGE,
                        {
                            "name": "format",
                            "in": "query",
                            "schema": {"enum": ["csv", "json", "parquet"]},
                        },
                    ],
                    "responses": {
                        "200": {"description": "the file"},
                        **_errors(400, *GUARDED, 503),
                    },
                }
            },
        },
    }

"""One exception tree for the whole engine.

ForecastError
├── ConfigError        a FORECAST_* variable is missing or invalid (names it and its value)
├── BrokerError        the Kafka broker cannot be started or reached
├── StoreError         ClickHouse failed or is slow (callers retry with backoff)
├── QueryError         ClickHouse refused an analyst query (unknown column, timeout, ...)
│   └── QueryRejected  refused before it ran (not one SELECT, a file, a table function, ...);
│                      its code names what (``sql_into_outfile``, ``sql_table``, ...)
├── AuthError          missing, unknown, revoked or insufficient credentials
├── WorkerStalled      the worker made no progress for FORECAST_STALL_EXIT (streams.liveness)
├── WebhookError       a webhook refused: bad URL, a non-public target, unknown id, limit
├── BackupError        a backup or restore refused: tampered, partial, unsafe paths, a
│                      target not empty, a store owned by a running process
├── ModelError         a model artifact is corrupt, incompatible or failed at inference
└── ForecastRequestError  an on-demand forecast refused: unknown sensor or model, a series
                       too long, an override the model cannot take, a bad horizon
"""

from __future__ import annotations


class ForecastError(Exception):
    """Base of every error the engine raises on purpose."""

    code = "error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class ConfigError(ForecastError):
    code = "bad_config"


class BrokerError(ForecastError):
    code = "broker_unavailable"


class StoreError(ForecastError):
    code = "store_unavailable"


class QueryError(ForecastError):
    code = "bad_query"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class QueryRejected(QueryError):
    code = "query_rejected"


class AuthError(ForecastError):
    code = "unauthorized"

    def __init__(self, message: str, *, code: str = "unauthorized") -> None:
        super().__init__(message)
        self.code = code


class ModelError(ForecastError):
    code = "model_error"


class WebhookError(ForecastError):
    code = "bad_webhook"

    def __init__(self, message: str, *, code: str = "bad_webhook") -> None:
        super().__init__(message)
        self.code = code


class BackupError(ForecastError):
    code = "backup_failed"


class ForecastRequestError(ForecastError):
    code = "bad_forecast_request"

    def __init__(self, message: str, *, code: str = "bad_forecast_request") -> None:
        super().__init__(message)
        self.code = code

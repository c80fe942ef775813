"""The one settings object: every ``FORECAST_*`` variable, validated at start.

A bad value raises :class:`ConfigError` naming the variable and the value; secrets are
shown as ``***``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from forecast.errors import ConfigError
from forecast.options import SIGNALS, DriftConfig, Network, parse_networks, parse_rules

ENV_PREFIX = "FORECAST_"


class Settings(BaseSettings):
    """Engine configuration, read from ``FORECAST_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Kafka
    kafka_bootstrap: str | None = Field(None, description="host:port; unset = embedded tansu")
    kafka_partitions: int = Field(4, ge=1, le=1024)
    kafka_session_timeout: float = Field(6.0, gt=0.5, le=300)
    topic_prefix: str = Field("", pattern=r"^[A-Za-z0-9._-]*$")
    broker_port: int = Field(0, ge=0, le=65535, description="embedded broker port; 0 = free")

    # ClickHouse
    clickhouse_url: SecretStr | None = Field(None, description="http://user:pass@host:8123/db")
    retention_days: int = Field(365, ge=1, le=36500)
    sink_batch_records: int = Field(200, ge=1, le=100_000, description="store records per insert")
    sink_consume: bool = Field(True, description="false: ClickHouse's Kafka engine stores them")
    clickhouse_analyst_url: SecretStr | None = Field(
        None, description="a read-only user for analyst SQL (deploy/clickhouse/analyst.sql)"
    )

    # Analyst SQL and exports: caps that a query cannot lift
    query_max_rows: int = Field(10_000, ge=1, le=1_000_000, description="rows a query returns")
    query_timeout: float = Field(30.0, gt=0, le=3600, description="seconds a query may run")
    query_max_memory: int = Field(512 << 20, ge=1 << 20, description="bytes a query may use")
    query_max_bytes_read: int = Field(8 << 30, ge=1 << 20, description="bytes a query may scan")
    query_max_result_bytes: int = Field(64 << 20, ge=1 << 10, description="bytes of a result")
    export_max_rows: int = Field(2_000_000, ge=1, description="rows one export may hold")
    export_timeout: float = Field(300.0, gt=0, le=86_400, description="seconds an export may run")

    # Scheduled backups by the store's owner (sinks.backup_schedule)
    backup_interval: float = Field(0.0, ge=0, description="seconds between backups; 0 = none")
    backup_keep: int = Field(7, ge=1, le=10_000, description="newest scheduled backups kept")
    backup_dir: Path | None = Field(None, description="where they go; unset = <data_dir>/backups")

    # Servers
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    ws_port: int = Field(8765, ge=0, le=65535)
    data_dir: Path = Path("./var")
    auth: bool = Field(True, description="false only for local use")
    jwt_secret: SecretStr | None = Field(None, description="HS256 secret for JWTs")
    jwt_public_key: str | None = Field(None, description="RS256 public key (PEM) for JWTs")
    jwt_issuer: str | None = Field(None, min_length=1, description="required iss claim")
    jwt_audience: str | None = Field(None, min_length=1, description="required aud claim")
    jwt_max_ttl: float = Field(86_400.0, gt=0, description="longest exp - iat, seconds")
    ws_queue_size: int = Field(1000, ge=1)
    rate_http: str = Field("60/minute,1000/hour", description="per key and per address")
    rate_ws_connect: str = Field("60/minute", description="connection attempts per address")
    rate_ws_messages: str = Field("20/second", description="client messages per connection")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS")
    replay_buffer: int = Field(1000, ge=0, description="predictions kept per sensor for resume")
    http_max_body: int = Field(1 << 20, ge=1024, description="request body cap, bytes")
    http_body_timeout: float = Field(30.0, gt=0, le=3600, description="to receive a body, s")
    http_header_timeout: float = Field(10.0, gt=0, le=300, description="to send request headers")
    http_keep_alive: float = Field(5.0, gt=0, le=300, description="idle keep-alive seconds")
    http_max_connections: int = Field(1000, ge=1, description="open HTTP connections at most")
    http_backlog: int = Field(2048, ge=1, description="connections queued in the kernel")
    trusted_proxies: str = Field("", description="addresses/CIDRs allowed to set X-Forwarded-For")

    # Stream processing
    worker_id: str = Field("0", pattern=r"^[A-Za-z0-9_-]{1,32}$", description="of N workers")
    worker_app: str = Field(
        "forecast-worker", pattern=r"^[A-Za-z0-9._-]{1,100}$", description="Faust app and group"
    )
    batch_max: int = Field(2000, ge=1)
    snapshot_interval: float = Field(
        2.0, ge=0, le=60, description="seconds between state checkpoints; 0: every batch"
    )
    max_record_bytes: int = Field(1_000_000, ge=64)
    max_batch_readings: int = Field(10_000, ge=1)
    max_future: float = Field(86_400.0, ge=0, description="seconds a reading may lie ahead")
    allowed_lateness: float = Field(3600.0, ge=0)
    sensor_allow: str = Field("*", description="comma-separated glob patterns of sensors")
    stall_timeout: float = Field(30.0, gt=0, le=3600, description="no progress: not ready")
    stall_exit: float = Field(120.0, gt=0, le=86_400, description="no progress: exit non-zero")

    # Forecasting
    horizon: int = Field(24, ge=1, le=10_000)
    season: int = Field(
        0, ge=0, le=10_000, description="baseline's season in readings; 0: a day of each sensor's"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="inference device")
    inference_threads: int = Field(
        1, ge=0, le=1024, description="torch CPU threads of a worker; 0: the CPUs / workers"
    )
    ondemand_history: int = Field(
        2048, ge=16, le=100_000, description="stored readings replayed per on-demand forecast"
    )

    residual_horizons: str = Field("1,6,24", description="forecast steps scored online")
    online_interval_rate: float = Field(
        0.005, ge=0, le=1, description="online interval adaptation per scored step; 0: off"
    )
    online_bias_rate: float = Field(
        0.0, ge=0, le=1, description="online point correction per scored step; 0: off"
    )
    online_coverage: float = Field(0.9, gt=0, lt=1, description="intervals' nominal coverage")

    # Drift and the retraining loop
    drift_detectors: str = Field("adwin,page_hinkley", description="adwin, page_hinkley, kswin")
    drift_adwin_delta: float = Field(0.002, gt=0, lt=1)
    drift_ph_threshold: float = Field(100.0, gt=0)
    drift_ks_alpha: float = Field(1e-5, gt=0, lt=1)
    drift_reference: int = Field(168, ge=2, description="readings of a sensor's reference")
    drift_cooldown: int = Field(24, ge=0, description="readings between events per detector")
    retrain: bool = Field(True, description="retrain on drift (needs a production model)")
    retrain_sensors: int = Field(3, ge=1, description="drifting sensors that trigger")
    retrain_window: float = Field(3600.0, gt=0, description="seconds they must fall within")
    retrain_cooldown: float = Field(3600.0, ge=0, description="seconds between retrainings")
    retrain_history: float = Field(30 * 86_400.0, gt=0, description="seconds of data to train")
    retrain_epochs: int = Field(5, ge=0)
    compare_residuals: int = Field(500, ge=1, description="residuals each model needs")
    compare_margin: float = Field(0.02, ge=0, lt=1, description="relative MAE gain to promote")

    # Webhooks (gateway.webhooks)
    alert_coverage_floor: float = Field(
        0.5, ge=0, le=1, description="online interval coverage below this: an alert"
    )
    webhook_allow_private: bool = Field(False, description="may post to non-public addresses")
    webhook_allow_networks: str = Field("", description="CIDRs webhooks may post to anyway")
    webhook_timeout: float = Field(5.0, gt=0, le=60, description="seconds per delivery attempt")
    webhook_max_attempts: int = Field(12, ge=1, le=100, description="attempts per delivery")
    webhook_pause_after: int = Field(8, ge=1, le=1000, description="failures in a row: pause")
    webhook_backoff: float = Field(2.0, gt=0, le=3600, description="first retry delay, seconds")
    webhook_backoff_max: float = Field(900.0, gt=0, le=86_400, description="longest retry delay")
    webhook_max_endpoints: int = Field(50, ge=1, le=10_000)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("residual_horizons")
    @classmethod
    def _horizons(cls, value: str) -> str:
        steps = [h.strip() for h in value.split(",") if h.strip()]
        if not steps or not all(h.isdigit() and int(h) >= 1 for h in steps):
            raise ValueError("expected comma-separated steps >= 1, e.g. 1,6,24")
        return value

    @field_validator("drift_detectors")
    @classmethod
    def _detectors(cls, value: str) -> str:
        unknown = {d.strip() for d in value.split(",") if d.strip()} - set(SIGNALS)
        if unknown:
            raise ValueError(f"unknown detectors {sorted(unknown)}; known: {sorted(SIGNALS)}")
        return value

    @field_validator("rate_http", "rate_ws_connect", "rate_ws_messages")
    @classmethod
    def _rate(cls, value: str) -> str:
        parse_rules(value)
        return value

    @field_validator("trusted_proxies", "webhook_allow_networks")
    @classmethod
    def _proxies(cls, value: str) -> str:
        parse_networks(value)
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _jwt_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value().encode()) < 32:
            raise ValueError("an HS256 secret needs at least 32 bytes, e.g. openssl rand -hex 32")
        return value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError("expected host:port[,host:port...]")
        return value

    @field_validator("clickhouse_url", "clickhouse_analyst_url")
    @classmethod
    def _clickhouse(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("expected http(s)://user:pass@host:8123/database")
        return value

    @model_validator(mode="after")
    def _one_jwt_key(self) -> Settings:
        if self.jwt_secret is not None and self.jwt_public_key is not None:
            raise ValueError("set FORECAST_JWT_SECRET or FORECAST_JWT_PUBLIC_KEY, not both")
        return self

    def topic(self, name: str) -> str:
        """The full name of one of the engine's topics, with the configured prefix."""
        return f"{self.topic_prefix}{name}"

    @cached_property
    def sensor_patterns(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.sensor_allow.split(",") if p.strip())

    @cached_property
    def horizons(self) -> tuple[int, ...]:
        return tuple(sorted({int(h) for h in self.residual_horizons.split(",") if h.strip()}))

    def drift_config(self) -> DriftConfig:
        """The drift detectors' configuration."""
        return DriftConfig(
            detectors=tuple(d.strip() for d in self.drift_detectors.split(",") if d.strip()),
            adwin_delta=self.drift_adwin_delta,
            ph_threshold=self.drift_ph_threshold,
            ks_alpha=self.drift_ks_alpha,
            reference=self.drift_reference,
            cooldown=self.drift_cooldown,
        )

    @cached_property
    def proxy_networks(self) -> tuple[Network, ...]:
        """FORECAST_TRUSTED_PROXIES as networks."""
        return parse_networks(self.trusted_proxies)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def run_dir(self) -> Path:
        """Runtime files of the process that owns the embedded store."""
        return self.data_dir / "run"

    @property
    def backups_dir(self) -> Path:
        return self.backup_dir if self.backup_dir is not None else self.data_dir / "backups"


SECRET_FIELDS = frozenset({"clickhouse_url", "clickhouse_analyst_url", "jwt_secret"})


def load_settings(**overrides: object) -> Settings:
    """Read and validate the settings; raise ConfigError naming the bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        if not error["loc"]:  # a rule across variables: its input is every value
            problems.append(error["msg"].removeprefix("Value error, "))
            continue
        field = str(error["loc"][0])
        shown = "***" if field in SECRET_FIELDS else repr(error.get("input"))
        problems.append(f"{ENV_PREFIX}{field.upper()}={shown}: {error['msg']}")
    return "invalid configuration: " + "; ".join(problems)

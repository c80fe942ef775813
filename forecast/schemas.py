"""The messages of the contract: readings in, predictions out (see design §3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime


@dataclass(slots=True)
class Reading:
    """One validated sensor reading; ``ts`` is epoch seconds (UTC)."""

    sensor_id: str
    ts: float
    value: float
    covariates: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Prediction:
    """A multi-horizon forecast for one sensor, issued after the reading at ``ts``."""

    sensor_id: str
    ts: float
    issued_at: float
    model: str
    model_version: int
    step_seconds: float
    yhat: list[float]
    lower: list[float]
    upper: list[float]
    seq: int
    stage: str = "production"  # or "shadow": stored, never published

    def to_message(self) -> dict[str, object]:
        """The JSON object published on `predictions` and pushed to websocket clients."""
        return {
            "type": "prediction",
            "sensor_id": self.sensor_id,
            "ts": iso(self.ts),
            "issued_at": iso(self.issued_at),
            "model": self.model,
            "model_version": self.model_version,
            "step_seconds": self.step_seconds,
            "yhat": self.yhat,
            "lower": self.lower,
            "upper": self.upper,
            "seq": self.seq,
        }


@dataclass(slots=True, frozen=True)
class DriftEvent:
    sensor_id: str
    ts: float
    detector: str
    signal: str
    model: str
    model_version: int
    detail: dict = field(default_factory=dict)

    def to_message(self) -> dict:
        return {
            "type": "drift",
            "sensor_id": self.sensor_id,
            "ts": iso(self.ts),
            "detector": self.detector,
            "signal": self.signal,
            "model": self.model,
            "model_version": self.model_version,
            "detail": self.detail,
        }

    @classmethod
    def from_message(cls, message: dict) -> DriftEvent:
        """The event of a `drift-events` message (ValueError, KeyError if malformed)."""
        return cls(
            str(message["sensor_id"]),
            datetime.fromisoformat(message["ts"]).timestamp(),
            str(message["detector"]),
            str(message["signal"]),
            str(message["model"]),
            int(message["model_version"]),
            dict(message.get("detail") or {}),
        )


def iso(ts: float) -> str:
    """RFC 3339 UTC with millisecond precision, e.g. ``2016-07-01T00:00:00.000Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

"""Per-sensor state: event-time bookkeeping plus each forecaster's own state."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SensorState:
    """What the worker remembers about one sensor between readings."""

    last_ts: float | None = None
    step: float | None = None  # seconds between the two latest readings
    seq: int = 0  # sequence number of the latest published prediction
    models: dict[str, dict] = field(default_factory=dict)  # forecaster name -> its state

    def to_json(self) -> dict:
        return {"last_ts": self.last_ts, "step": self.step, "seq": self.seq, "models": self.models}

    @classmethod
    def from_json(cls, doc: dict) -> SensorState:
        return cls(doc["last_ts"], doc["step"], doc["seq"], doc["models"])

    def observe(self, ts: float) -> None:
        """Advance event time to ``ts`` (newer than ``last_ts``)."""
        if self.last_ts is not None:
            self.step = ts - self.last_ts
        self.last_ts = ts

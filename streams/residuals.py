"""Forecast residuals, online (pure, no I/O).

Each issued forecast leaves, for every tracked horizon ``h``, its step waiting in the
sensor's state: ``[target_ts, yhat, lower, upper]``. When a reading arrives within half
a step of a target time, the step becomes a :class:`Residual`; steps whose target passed
without a reading are dropped. So a sensor holds at most about ``sum(horizons)`` waiting
steps per model. Per sensor, model and horizon the state also keeps exponentially
weighted means of the absolute error and of interval coverage (the online MAE and
coverage, exported to Prometheus).
"""

from __future__ import annotations

from dataclasses import dataclass

from forecast.schemas import Prediction

DEFAULT_HORIZONS = (1, 6, 24)


@dataclass(slots=True, frozen=True)
class Residual:
    sensor_id: str
    model: str
    model_version: int
    stage: str
    horizon: int
    target_ts: float
    actual: float
    yhat: float
    lower: float
    upper: float

    @property
    def error(self) -> float:
        return self.actual - self.yhat

    @property
    def covered(self) -> bool:
        return self.lower <= self.actual <= self.upper


class ResidualTracker:
    """Matches forecasts with the readings at their target times."""

    def __init__(self, horizons: tuple[int, ...] = DEFAULT_HORIZONS, alpha: float = 0.02):
        self.horizons = horizons
        self.alpha = alpha

    def expect(self, book: dict, prediction: Prediction) -> None:
        """Remember the tracked steps of a forecast just issued."""
        entry = book.setdefault(_key(prediction.model, prediction.model_version), _blank())
        entry["stage"] = prediction.stage
        for h in self.horizons:
            if h <= len(prediction.yhat):
                entry["pending"].setdefault(str(h), []).append(
                    (
                        prediction.ts + h * prediction.step_seconds,
                        prediction.yhat[h - 1],
                        prediction.lower[h - 1],
                        prediction.upper[h - 1],
                        prediction.step_seconds / 2,
                    )
                )

    def observe(self, book: dict, sensor_id: str, ts: float, value: float) -> list[Residual]:
        """The residuals a reading completes; updates the online MAE and coverage."""
        out = []
        for key, entry in book.items():
            name, version = key.rsplit("@", 1)
            for h, waiting in entry["pending"].items():
                # Steps wait in the order of their targets: only the front can be due.
                done = 0
                for target, yhat, lower, upper, tolerance in waiting:
                    if target > ts + tolerance:
                        break
                    done += 1
                    if target >= ts - tolerance:
                        made = Residual(
                            sensor_id,
                            name,
                            int(version),
                            entry["stage"],
                            int(h),
                            target,
                            value,
                            yhat,
                            lower,
                            upper,
                        )
                        self._learn(entry, h, made)
                        out.append(made)
                del waiting[:done]
        return out

    def online(self, book: dict) -> list[tuple[str, int, str, float, float]]:
        """(model, version, horizon, MAE, coverage) for each model and horizon seen."""
        out = []
        for key, entry in book.items():
            name, version = key.rsplit("@", 1)
            for h, mae in entry["mae"].items():
                out.append((name, int(version), h, mae, entry["coverage"][h]))
        return out

    def prune(self, book: dict, serving: set[str]) -> None:
        """Forget models that no longer serve (keys ``name@version``)."""
        for stale in book.keys() - serving:
            del book[stale]

    def _learn(self, entry: dict, h: str, residual: Residual) -> None:
        n = entry["n"][h] = entry["n"].get(h, 0) + 1
        weight = max(self.alpha, 1.0 / n)
        for name, value in (("mae", abs(residual.error)), ("coverage", float(residual.covered))):
            old = entry[name].get(h, value)
            entry[name][h] = old + weight * (value - old)


def _key(model: str, version: int) -> str:
    return f"{model}@{version}"


def _blank() -> dict:
    return {"stage": "production", "pending": {}, "mae": {}, "coverage": {}, "n": {}}

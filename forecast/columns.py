"""Readings and predictions of one micro-batch as columns (the worker's hot path).

:class:`forecast.schemas.Prediction` is one prediction as an object; a
:class:`PredictionBlock` holds many as arrays and writes the same `predictions` messages
(:meth:`PredictionBlock.messages` equals ``orjson.dumps(p.to_message())`` for each row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from forecast.schemas import Prediction, Reading, iso


def iso_many(ts: np.ndarray) -> list[str]:
    """:func:`forecast.schemas.iso` of many epoch seconds: the microsecond the way
    ``datetime`` rounds it, cut to the millisecond the way ``isoformat`` does."""
    stamps = np.datetime_as_string(epoch_ms(ts).astype("datetime64[ms]"), unit="ms")
    return [f"{stamp}Z" for stamp in stamps.tolist()]


def epoch_ms(ts: np.ndarray | Sequence[float]) -> np.ndarray:
    """Epoch milliseconds as ``datetime.fromtimestamp`` sees them: the fraction rounded
    half-even to the microsecond (on the fraction alone: ``ts * 1e6`` has too few bits),
    then cut to the millisecond."""
    frac, whole = np.modf(np.asarray(ts, dtype=np.float64))
    micros = whole.astype(np.int64) * 1_000_000 + np.rint(frac * 1e6).astype(np.int64)
    return micros // 1000


@dataclass(slots=True)
class ReadingBlock:
    """Stored readings: accepted, and late ones taken in as corrections."""

    sensor_id: list[str]
    ts: np.ndarray
    value: np.ndarray
    covariates: list[dict[str, float]] | None = None  # None: no reading has any

    def __len__(self) -> int:
        return len(self.sensor_id)

    def rows(self) -> list[Reading]:
        covariates = self.covariates or [{}] * len(self)
        return [
            Reading(s, t, v, c)
            for s, t, v, c in zip(
                self.sensor_id, self.ts.tolist(), self.value.tolist(), covariates, strict=True
            )
        ]


@dataclass(slots=True)
class PredictionBlock:
    """Predictions of one batch and stage: one row each, (n, horizon) intervals."""

    sensor_id: list[str]
    ts: np.ndarray  # float64, the reading each prediction follows
    issued_at: float
    model: list[str]
    model_version: np.ndarray  # int64
    step_seconds: np.ndarray  # float64
    yhat: np.ndarray  # float64 (n, horizon)
    lower: np.ndarray
    upper: np.ndarray
    seq: np.ndarray  # int64
    stage: str = "production"

    def __len__(self) -> int:
        return len(self.sensor_id)

    @classmethod
    def concat(cls, blocks: Sequence[PredictionBlock], stage: str) -> PredictionBlock | None:
        blocks = [b for b in blocks if len(b)]
        if not blocks:
            return None
        if len(blocks) == 1:
            return blocks[0]
        return cls(
            [s for b in blocks for s in b.sensor_id],
            np.concatenate([b.ts for b in blocks]),
            blocks[0].issued_at,
            [m for b in blocks for m in b.model],
            np.concatenate([b.model_version for b in blocks]),
            np.concatenate([b.step_seconds for b in blocks]),
            np.concatenate([b.yhat for b in blocks]),
            np.concatenate([b.lower for b in blocks]),
            np.concatenate([b.upper for b in blocks]),
            np.concatenate([b.seq for b in blocks]),
            stage,
        )

    def take(self, order: np.ndarray) -> PredictionBlock:
        """The rows at ``order``, in that order."""
        return PredictionBlock(
            [self.sensor_id[i] for i in order.tolist()],
            self.ts[order],
            self.issued_at,
            [self.model[i] for i in order.tolist()],
            self.model_version[order],
            self.step_seconds[order],
            self.yhat[order],
            self.lower[order],
            self.upper[order],
            self.seq[order],
            self.stage,
        )

    def messages(self) -> list[bytes]:
        """The `predictions` message of each row: byte for byte
        ``orjson.dumps(p.to_message())`` (orjson formats a float64 row as it formats the
        list of its floats; the times are formatted for the whole block at once)."""
        issued = iso(self.issued_at)
        option = orjson.OPT_SERIALIZE_NUMPY
        yhat, lower, upper = (
            np.ascontiguousarray(a, np.float64) for a in (self.yhat, self.lower, self.upper)
        )
        return [
            orjson.dumps(
                {
                    "type": "prediction",
                    "sensor_id": sensor_id,
                    "ts": ts,
                    "issued_at": issued,
                    "model": model,
                    "model_version": version,
                    "step_seconds": step,
                    "yhat": yhat[i],
                    "lower": lower[i],
                    "upper": upper[i],
                    "seq": seq,
                },
                option=option,
            )
            for i, (sensor_id, ts, model, version, step, seq) in enumerate(
                zip(
                    self.sensor_id,
                    iso_many(self.ts),
                    self.model,
                    self.model_version.tolist(),
                    self.step_seconds.tolist(),
                    self.seq.tolist(),
                    strict=True,
                )
            )
        ]

    def rows(self) -> list[Prediction]:
        """As objects (tests and the rare callers that want them)."""
        return [
            Prediction(
                self.sensor_id[i],
                float(self.ts[i]),
                self.issued_at,
                self.model[i],
                int(self.model_version[i]),
                float(self.step_seconds[i]),
                self.yhat[i].tolist(),
                self.lower[i].tolist(),
                self.upper[i].tolist(),
                int(self.seq[i]),
                self.stage,
            )
            for i in range(len(self))
        ]

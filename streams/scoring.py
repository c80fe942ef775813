"""Forecast residuals, online, in columns: :mod:`streams.residuals` vectorized over sensors.

One :class:`ScoreColumns` holds one model key (``name@version``) for many sensors, each
sensor at an integer slot. Per slot and tracked horizon it keeps the steps waiting for
their target in a preallocated ring (FIFO, in issue order) and the exponentially
weighted online MAE and coverage, with the same rules and float64 arithmetic as
:class:`streams.residuals.ResidualTracker`, so residuals and statistics are bit-identical.

One deliberate difference: a FIFO holds at most ``max_pending`` steps; when it is full,
:meth:`ScoreColumns.expect` drops its oldest step (the reference grows without bound
when a step's target lies far ahead and blocks the steps behind it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streams.residuals import Residual

_FIELDS = ("target", "yhat", "lower", "upper", "tolerance")  # one ring per field


@dataclass(slots=True, frozen=True)
class Scored:
    """Residuals completed by one :meth:`ScoreColumns.observe` call, one row each.

    Rows are ordered by reading index, then horizon in the order of the columns'
    ``horizons``, then FIFO (issue) order. ``stage`` holds codes into ``stage_names``.
    """

    index: np.ndarray  # int64: the reading's position in the observe call
    horizon: np.ndarray  # int64
    target_ts: np.ndarray  # float64, as the rest
    actual: np.ndarray
    yhat: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    stage: np.ndarray  # int64 codes
    stage_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def error(self) -> np.ndarray:
        return self.actual - self.yhat

    @property
    def covered(self) -> np.ndarray:
        return (self.lower <= self.actual) & (self.actual <= self.upper)

    def stages(self) -> list[str]:
        """The stage of each row, as a string."""
        return [self.stage_names[c] for c in self.stage.tolist()]

    def residuals(self, sensor_ids: Sequence[str], model: str, version: int) -> list[Residual]:
        """The rows as reference :class:`Residual` objects (``sensor_ids`` by reading index)."""
        rows = zip(
            self.index.tolist(),
            self.stages(),
            self.horizon.tolist(),
            self.target_ts.tolist(),
            self.actual.tolist(),
            self.yhat.tolist(),
            self.lower.tolist(),
            self.upper.tolist(),
            strict=True,
        )
        return [Residual(sensor_ids[i], model, version, *rest) for i, *rest in rows]


class ScoreColumns:
    """Pending steps and online error statistics of one model key (name@version) over slots."""

    def __init__(
        self,
        horizons: tuple[int, ...],
        alpha: float = 0.02,
        capacity: int = 1024,
        max_pending: int | None = None,
    ):
        self.horizons = tuple(int(h) for h in horizons)
        self.alpha = alpha
        self.max_pending = max_pending or 4 * max(self.horizons) + 16
        self._stage_names: list[str] = ["production", "shadow"]
        self.capacity = 0
        self._allocate(capacity)

    # -- storage ---------------------------------------------------------------------

    def _allocate(self, capacity: int) -> None:
        """Fresh arrays for ``capacity`` slots, keeping the first ``self.capacity`` ones."""
        k, p, keep = len(self.horizons), self.max_pending, self.capacity
        rings = {f: np.zeros((capacity * k, p)) for f in _FIELDS}
        head = np.zeros(capacity * k, np.int64)
        count = np.zeros(capacity * k, np.int64)
        n = np.zeros(capacity * k, np.int64)
        mae = np.full(capacity * k, np.nan)
        coverage = np.full(capacity * k, np.nan)
        stage = np.zeros(capacity, np.int64)
        if keep:
            for f in _FIELDS:
                rings[f][: keep * k] = self._rings[f]
            for new, old in ((head, self._head), (count, self._count), (n, self._n)):
                new[: keep * k] = old
            mae[: keep * k], coverage[: keep * k] = self._mae, self._coverage
            stage[:keep] = self._stage
        self._rings, self._head, self._count = rings, head, count
        self._n, self._mae, self._coverage, self._stage = n, mae, coverage, stage
        self.capacity = capacity

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` slots, contents preserved (the caller picks the size)."""
        if capacity > self.capacity:
            self._allocate(capacity)

    def reset(self, slots: np.ndarray | int) -> None:
        """Forget those slots (or that one): no pending steps, no statistics, stage
        production."""
        if np.ndim(slots) == 0:  # one slot: its cells are a slice, no index arrays
            k = len(self.horizons)
            slots = int(slots)
            q: slice | np.ndarray = slice(slots * k, slots * k + k)
        else:
            slots = np.asarray(slots, np.int64)
            q = self._pairs(slots).ravel()
        self._head[q] = self._count[q] = self._n[q] = 0
        self._mae[q] = self._coverage[q] = np.nan
        self._stage[slots] = 0

    def _pairs(self, slots: np.ndarray) -> np.ndarray:
        """Flat (slot, horizon) indices, shape (n, len(horizons))."""
        k = len(self.horizons)
        return slots[:, None] * k + np.arange(k)

    def _stage_code(self, stage: str) -> int:
        if stage not in self._stage_names:
            self._stage_names.append(stage)
        return self._stage_names.index(stage)

    # -- the hot path ----------------------------------------------------------------

    def expect(
        self,
        slots: np.ndarray,
        ts: np.ndarray,
        step_seconds: np.ndarray,
        yhat: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        stage: str,
    ) -> None:
        """Remember the tracked steps of forecasts just issued (``slots`` unique).

        ``yhat``, ``lower`` and ``upper`` are (n, H); a tracked horizon beyond H is skipped.
        A full FIFO drops its oldest step first.
        """
        slots = np.asarray(slots, np.int64)
        ts, step = np.asarray(ts, np.float64), np.asarray(step_seconds, np.float64)
        bands = [np.asarray(a, np.float64) for a in (yhat, lower, upper)]
        self._stage[slots] = self._stage_code(stage)
        pairs = self._pairs(slots)
        for j, h in enumerate(self.horizons):
            if h <= bands[0].shape[1]:
                values = (ts + h * step, *(b[:, h - 1] for b in bands), step / 2)
                self._push(pairs[:, j], values)

    def _push(self, q: np.ndarray, values: tuple[np.ndarray, ...]) -> None:
        p = self.max_pending
        full = self._count[q] == p
        if full.any():
            self._head[q[full]] = (self._head[q[full]] + 1) % p
            self._count[q[full]] -= 1
        at = (self._head[q] + self._count[q]) % p
        for f, v in zip(_FIELDS, values, strict=True):
            self._rings[f][q, at] = v
        self._count[q] += 1

    def observe(self, slots: np.ndarray, ts: np.ndarray, values: np.ndarray) -> Scored:
        """The residuals these readings complete (``slots`` unique); updates the statistics.

        Per slot and horizon, front steps with ``target <= ts + tolerance`` leave the FIFO;
        those with ``target >= ts - tolerance`` become residuals. Each round takes at most
        one step per FIFO, so several steps of one FIFO are learnt in FIFO order.
        """
        slots = np.asarray(slots, np.int64)
        ts, values = np.asarray(ts, np.float64), np.asarray(values, np.float64)
        k = len(self.horizons)
        q = self._pairs(slots).ravel()
        row = np.arange(q.size)  # reading index * k + horizon position
        live = self._count[q] > 0
        q, row = q[live], row[live]
        rounds = []
        while q.size:
            emitted, q, row = self._round(q, row, ts[row // k], values[row // k])
            rounds.append(emitted)
        return self._collect(rounds)

    def _round(self, q: np.ndarray, row: np.ndarray, ts: np.ndarray, values: np.ndarray):
        """Pop the due front steps of FIFOs ``q``; learn and return those that hit."""
        head = self._head[q]
        target, tol = self._rings["target"][q, head], self._rings["tolerance"][q, head]
        due = target <= ts + tol
        q, row, head, target, tol = q[due], row[due], head[due], target[due], tol[due]
        ts, values = ts[due], values[due]
        self._head[q] = (head + 1) % self.max_pending
        self._count[q] -= 1
        hit = target >= ts - tol
        qh, hh = q[hit], head[hit]
        emitted = (
            row[hit],
            target[hit],
            values[hit],
            *(self._rings[f][qh, hh] for f in ("yhat", "lower", "upper")),
            self._stage[qh // len(self.horizons)],
        )
        self._learn(qh, *emitted[2:6])
        more = self._count[q] > 0
        return emitted, q[more], row[more]

    def _learn(self, q: np.ndarray, actual, yhat, lower, upper) -> None:
        """The reference's update: first value initialises, weight ``max(alpha, 1/n)``."""
        n = self._n[q] + 1
        self._n[q] = n
        weight = np.maximum(self.alpha, 1.0 / n)
        fresh = n == 1
        for stat, value in (
            (self._mae, np.abs(actual - yhat)),
            (self._coverage, ((lower <= actual) & (actual <= upper)).astype(np.float64)),
        ):
            old = np.where(fresh, value, stat[q])
            stat[q] = old + weight * (value - old)

    def _collect(self, rounds: list[tuple[np.ndarray, ...]]) -> Scored:
        k = len(self.horizons)
        if not rounds:
            empty = np.empty(0)
            cols = [empty.astype(np.int64), *[empty] * 5, empty.astype(np.int64)]
        elif len(rounds) == 1:
            cols = list(rounds[0])
        else:
            cols = [np.concatenate(c) for c in zip(*rounds, strict=True)]
            order = np.argsort(cols[0], kind="stable")  # rounds keep FIFO order per row
            cols = [c[order] for c in cols]
        row, target, actual, yhat, lower, upper, stage = cols
        horizon = np.asarray(self.horizons, np.int64)[row % k]
        return Scored(
            row // k, horizon, target, actual, yhat, lower, upper, stage, tuple(self._stage_names)
        )

    def online(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MAE, coverage and counts, each (n, len(horizons)); NaN / 0 where nothing scored."""
        q = self._pairs(np.asarray(slots, np.int64))
        return self._mae[q], self._coverage[q], self._n[q]

    # -- snapshots -------------------------------------------------------------------

    def to_doc(self, slot: int) -> dict:
        """One slot as a JSON-able dict, in the layout of the reference's book entry."""
        return self.to_docs(np.array([slot]))[0]

    def to_docs(self, slots: np.ndarray) -> list[dict]:
        """:meth:`to_doc` of many slots, gathered at once (pending steps as (k, 5) arrays)."""
        slots = np.asarray(slots, np.int64)
        q = self._pairs(slots)  # (n, k)
        counts = self._count[q]
        width = int(counts.max()) if counts.size else 0
        at = (self._head[q][..., None] + np.arange(width)) % self.max_pending  # (n, k, w)
        steps = np.stack([self._rings[f][q[..., None], at] for f in _FIELDS], axis=-1)
        n, mae, coverage = self._n[q].tolist(), self._mae[q].tolist(), self._coverage[q].tolist()
        names = [str(h) for h in self.horizons]
        docs = []
        for i, (count, stage) in enumerate(
            zip(counts.tolist(), self._stage[slots].tolist(), strict=True)
        ):
            doc: dict = {"stage": self._stage_names[stage]}
            doc["pending"] = {
                h: steps[i, j, :c] for j, (h, c) in enumerate(zip(names, count, strict=True)) if c
            }
            seen = [j for j, scored in enumerate(n[i]) if scored]
            doc["mae"] = {names[j]: mae[i][j] for j in seen}
            doc["coverage"] = {names[j]: coverage[i][j] for j in seen}
            doc["n"] = {names[j]: n[i][j] for j in seen}
            docs.append(doc)
        return docs

    def from_doc(self, slot: int, doc: dict) -> None:
        """Restore one slot from :meth:`to_doc` (or a reference book entry).

        Horizons not tracked are ignored; of a longer FIFO only the newest steps stay.
        """
        self.reset(slot)
        k = len(self.horizons)
        self._stage[slot] = self._stage_code(doc.get("stage", "production"))
        pending, scored = doc.get("pending", {}), doc.get("n", {})
        for j, h in enumerate(self.horizons):
            q = slot * k + j
            steps = pending.get(str(h), [])[-self.max_pending :]
            if len(steps):
                cells = np.asarray(steps, np.float64).reshape(-1, len(_FIELDS))
                for f, column in zip(_FIELDS, cells.T, strict=True):
                    self._rings[f][q, : len(cells)] = column
                self._count[q] = len(cells)
            if scored.get(str(h)):
                self._n[q] = scored[str(h)]
                self._mae[q] = _number(doc["mae"][str(h)])
                self._coverage[q] = _number(doc["coverage"][str(h)])


def _number(value: float | None) -> float:
    """A float from JSON, where orjson writes NaN as null."""
    return np.nan if value is None else float(value)

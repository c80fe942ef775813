"""Forecasters over columns: every sensor's model state in preallocated arrays, indexed by
an integer slot, advanced for many sensors at once (pure maths, no I/O).

The per-sensor forecasters of :mod:`models.base` (JSON-able dict states, one reading at
a time) stay the reference; each class here gives the same forecasts as its reference on
the same readings (``tests/test_columns.py``), and its per-slot snapshot is the
reference's state dict, so a snapshot restores into either.

=======================  ===================================================
:class:`NaiveColumns`    the seasonal-naive baseline: a ring of its season
:class:`LSTMColumns`     the LSTM: a ring of ``lookback`` values, ``(h, c)``
:class:`DictColumns`     any other forecaster: its dict states, per slot
=======================  ===================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from models.base import NOT_DUE, StreamingForecaster
from models.baseline import Z_90, SeasonalNaive
from models.lstm import LSTMForecaster
from models.rings import Ring, grown
from models.timing import TimingColumns


@dataclass(slots=True)
class Forecasts:
    """Forecasts for the n slots of one call: (n, horizon) float64 arrays, NaN where a
    slot has none; ``made`` where a forecast exists, ``due`` False where a model with a
    cadence skips the reading (``NOT_DUE``)."""

    yhat: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    made: np.ndarray
    due: np.ndarray

    @classmethod
    def empty(cls, n: int, horizon: int) -> Forecasts:
        nan = np.full((n, horizon), np.nan)
        return cls(nan, nan.copy(), nan.copy(), np.zeros(n, bool), np.ones(n, bool))

    @property
    def usable(self) -> np.ndarray:
        """Made and finite (a NaN or infinity anywhere makes a forecast unusable)."""
        finite = np.isfinite(self.yhat).all(1) & np.isfinite(self.lower).all(1)
        return self.made & finite & np.isfinite(self.upper).all(1)


class ModelColumns(Protocol):
    """One forecaster's state for every slot."""

    forecaster: StreamingForecaster

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` slots (contents kept)."""

    def reset(self, slots: np.ndarray) -> None:
        """Fresh states for ``slots``."""

    def advance(self, slots: np.ndarray, values: np.ndarray, ts: np.ndarray) -> Forecasts:
        """One reading for each of ``slots`` (unique within a call); the forecasts after."""

    def correct(self, slot: int, value: float, newer: int, replace: bool) -> None:
        """A late reading into one slot's windows (see ``StreamingForecaster.correct``)."""

    def to_doc(self, slot: int) -> dict:
        """The slot's state as its reference forecaster's dict."""

    def to_docs(self, slots: np.ndarray) -> list[dict]:
        """:meth:`to_doc` of many slots (gathered at once where the state is columnar)."""

    def from_doc(self, slot: int, doc: dict) -> None:
        """Restore a slot from a reference dict state."""


def columns_for(forecaster: StreamingForecaster, capacity: int) -> ModelColumns:
    """The columnar form of ``forecaster``: native for the baseline and the LSTM."""
    if isinstance(forecaster, SeasonalNaive):
        return NaiveColumns(forecaster, capacity)
    if isinstance(forecaster, LSTMForecaster):
        return LSTMColumns(forecaster, capacity)
    return DictColumns(forecaster, capacity)


#: Rounds in a batch from which a forecaster with ``advance_rounds`` takes them at once.
SEQUENCE_ROUNDS = 4


def advance_rounds(
    columns: ModelColumns,
    slots: np.ndarray,
    values: np.ndarray,
    ts: np.ndarray,
    rounds: list[np.ndarray],
    at_once_from: int = SEQUENCE_ROUNDS,
) -> list[Forecasts]:
    """``columns.advance`` of every round (positions of each slot's k-th reading), in
    one go where the columns can and there are ``at_once_from`` rounds or more."""
    at_once = getattr(columns, "advance_rounds", None)
    if at_once is not None and len(rounds) >= at_once_from:
        return at_once(slots, values, ts, rounds)
    return [columns.advance(slots[at], values[at], ts[at]) for at in rounds]


class NaiveColumns:
    """:class:`models.baseline.SeasonalNaive` over slots: the latest values of each slot's
    season in a ring as wide as the longest season (widened as seasons are learned), the
    weighted variance of the rule's one-step errors, and each slot's timing
    (:class:`models.timing.TimingColumns`) when the seasons are learned."""

    def __init__(self, forecaster: SeasonalNaive, capacity: int) -> None:
        self.forecaster = forecaster
        self.history = Ring(capacity, forecaster.season or 2, np.float64)
        self.held = np.zeros(capacity, np.int64)  # values of the slot's season held
        self.var = np.zeros(capacity)
        self.errors = np.zeros(capacity, np.int64)
        self.timing = TimingColumns(capacity, forecaster.max_season) if forecaster.learns else None
        self._steps = np.arange(forecaster.horizon)  # h - 1

    def grow(self, capacity: int) -> None:
        self.history.grow(capacity)
        self.held = grown(self.held, capacity)
        self.var = grown(self.var, capacity)
        self.errors = grown(self.errors, capacity)
        if self.timing is not None:
            self.timing.grow(capacity)

    def reset(self, slots: np.ndarray) -> None:
        self.history.reset(slots)
        self.held[slots] = 0
        self.var[slots] = 0.0
        self.errors[slots] = 0
        if self.timing is not None:
            self.timing.reset(slots)

    def advance(self, slots: np.ndarray, values: np.ndarray, ts: np.ndarray) -> Forecasts:
        ring, alpha = self.history, self.forecaster.alpha
        season, held = self._season(slots), self.held[slots]
        seen = held > 0
        back = np.where((season > 0) & (held == season), season, 1)  # the one-step rule
        error = values - ring.data[slots, (ring.pos[slots] - back) % ring.size]
        weight = np.maximum(alpha, 1.0 / (self.errors[slots] + 1))
        var = self.var[slots]
        self.var[slots] = np.where(seen, var + weight * (error * error - var), var)
        self.errors[slots] += seen
        if self.timing is not None:
            season = self.timing.learn(slots, ts)
            need = int(season.max(initial=0))
            if need > ring.size:  # doubling: a few copies while the seasons are learned
                ring.widen(min(max(need, 2 * ring.size), self.forecaster.max_season))
        ring.push(slots, values)
        self.held[slots] = np.minimum(held + 1, np.maximum(season, 1))
        return self._forecast(slots)

    def _season(self, slots: np.ndarray) -> np.ndarray:
        fixed = self.forecaster.season
        return self.timing.season[slots] if fixed is None else np.full(len(slots), fixed)

    def _forecast(self, slots: np.ndarray) -> Forecasts:
        ring, steps = self.history, self._steps
        season = self._season(slots)
        full = (season > 0) & (self.held[slots] == season)
        cycle = np.maximum(season, 1)[:, None]
        pos = ring.pos[slots]
        latest = ring.data[slots, (pos - 1) % ring.size]
        index = (pos[:, None] - cycle + steps % cycle) % ring.size  # a season back, or more
        yhat = np.where(full[:, None], ring.data[slots[:, None], index], latest[:, None])
        half = np.sqrt(self.var[slots])[:, None] * (Z_90 * np.sqrt(1 + steps // cycle))
        made = np.ones(len(slots), bool)
        return Forecasts(yhat, yhat - half, yhat + half, made, made.copy())

    def correct(self, slot: int, value: float, newer: int, replace: bool) -> None:
        doc = self.to_doc(slot)
        doc["history"] = doc["history"].tolist()
        self.forecaster.correct(doc, value, newer, replace)
        self.from_doc(slot, doc)

    def to_doc(self, slot: int) -> dict:
        return self.to_docs(np.array([slot]))[0]

    def to_docs(self, slots: np.ndarray) -> list[dict]:
        docs = [
            {"history": history, "var": var, "errors": errors}
            for history, var, errors in zip(
                self.history.latest(slots, self.held[slots]),
                self.var[slots].tolist(),
                self.errors[slots].tolist(),
                strict=True,
            )
        ]
        if self.timing is not None:
            for doc, timing in zip(docs, self.timing.to_docs(slots), strict=True):
                doc.update(timing)
        return docs

    def from_doc(self, slot: int, doc: dict) -> None:
        history = np.asarray(doc["history"], dtype=np.float64)
        self.history.widen(len(history))
        self.history.set_row(slot, history)
        self.held[slot] = len(history)
        self.var[slot] = doc["var"]
        self.errors[slot] = doc["errors"]
        if self.timing is not None:
            self.timing.from_doc(slot, doc)


class LSTMColumns:
    """:class:`models.lstm.LSTMForecaster` over slots: a ring of the last ``lookback``
    values (float32, as the reference's window) and ``(h, c)`` as tensors. One forward
    step for all the call's full windows."""

    def __init__(self, forecaster: LSTMForecaster, capacity: int) -> None:
        self.forecaster = forecaster
        self.window = Ring(capacity, forecaster.lookback, np.float32)
        hidden = forecaster.net.hidden
        self.h = np.zeros((capacity, hidden), np.float32)
        self.c = np.zeros((capacity, hidden), np.float32)

    def grow(self, capacity: int) -> None:
        self.window.grow(capacity)
        self.h = grown(self.h, capacity)
        self.c = grown(self.c, capacity)

    def reset(self, slots: np.ndarray) -> None:
        self.window.reset(slots)
        self.h[slots] = 0.0
        self.c[slots] = 0.0

    @torch.inference_mode()
    def advance(self, slots: np.ndarray, values: np.ndarray, ts: np.ndarray) -> Forecasts:
        model = self.forecaster
        self.window.push(slots, values.astype(np.float32))
        out = Forecasts.empty(len(slots), model.horizon)
        ready = np.flatnonzero(self.window.count[slots] == model.lookback)
        if len(ready) == 0:
            return out
        chosen = slots[ready]
        device = model.device
        win = torch.from_numpy(self.window.ordered(chosen)).to(device)
        h = torch.from_numpy(self.h[chosen]).to(device)
        c = torch.from_numpy(self.c[chosen]).to(device)
        yhat, std, h, c = model.net.step(win, ts[ready], h, c)
        half = std.unsqueeze(-1) * model.quantiles
        self.h[chosen] = h.cpu().numpy()
        self.c[chosen] = c.cpu().numpy()
        out.yhat[ready] = yhat.cpu().numpy()
        out.lower[ready] = (yhat - half).cpu().numpy()
        out.upper[ready] = (yhat + half).cpu().numpy()
        out.made[ready] = True
        return out

    @torch.inference_mode()
    def advance_rounds(
        self, slots: np.ndarray, values: np.ndarray, ts: np.ndarray, rounds: list[np.ndarray]
    ) -> list[Forecasts]:
        """:meth:`advance` round after round (``rounds``: positions in ``slots`` of each
        slot's k-th reading), with the recurrent steps of each slot in one pass: slots
        with as many full windows in the batch share one LSTM call. A replay's batch of 7
        sensors by 286 readings was 286 calls of a few hundred µs each."""
        model = self.forecaster
        n, lookback = len(slots), model.lookback
        windows = np.empty((n, lookback), np.float32)
        ready = np.zeros(n, bool)
        values = values.astype(np.float32)
        for at in rounds:  # the rings advance as before; each full window is kept
            self.window.push(slots[at], values[at])
            full = at[self.window.count[slots[at]] == lookback]
            windows[full] = self.window.ordered(slots[full])
            ready[full] = True
        yhat, lower, upper = (np.full((n, model.horizon), np.nan) for _ in range(3))
        positions = np.flatnonzero(ready)  # by slot, then in reading order:
        positions = positions[np.argsort(slots[positions], kind="stable")]
        owner = slots[positions]
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        lengths = np.diff(np.r_[starts, len(owner)])
        device = model.device
        for length in np.unique(lengths).tolist():
            first = starts[lengths == length]
            at = positions[first[:, None] + np.arange(length)]  # (sensors, length)
            group = owner[first]
            h = torch.from_numpy(self.h[group]).to(device)
            c = torch.from_numpy(self.c[group]).to(device)
            win = torch.from_numpy(windows[at]).to(device)
            y, std, h, c = model.net.steps(win, ts[at], h, c)
            half = std.unsqueeze(-1) * model.quantiles
            self.h[group] = h.cpu().numpy()
            self.c[group] = c.cpu().numpy()
            yhat[at] = y.cpu().numpy()
            lower[at] = (y - half).cpu().numpy()
            upper[at] = (y + half).cpu().numpy()
        return [
            Forecasts(yhat[at], lower[at], upper[at], ready[at], np.ones(len(at), bool))
            for at in rounds
        ]

    def correct(self, slot: int, value: float, newer: int, replace: bool) -> None:
        self.window.place(slot, value, newer, replace)

    def to_doc(self, slot: int) -> dict:
        return self.to_docs(np.array([slot]))[0]

    def to_docs(self, slots: np.ndarray) -> list[dict]:
        """As the reference: ``h`` and ``c`` are None until the first full window."""
        started = (self.window.count[slots] == self.window.size).tolist()
        h, c = self.h[slots], self.c[slots]
        return [
            {"buf": buf, "h": h[i] if on else None, "c": c[i] if on else None}
            for i, (buf, on) in enumerate(zip(self.window.rows(slots), started, strict=True))
        ]

    def from_doc(self, slot: int, doc: dict) -> None:
        self.window.set_row(slot, np.asarray(doc["buf"], dtype=np.float32))
        for name in ("h", "c"):
            row = doc.get(name)
            getattr(self, name)[slot] = 0.0 if row is None else np.asarray(row, np.float32)


class DictColumns:
    """Any forecaster, through its own per-sensor dict states (one per slot)."""

    def __init__(self, forecaster: StreamingForecaster, capacity: int) -> None:
        self.forecaster = forecaster
        self.states: list[dict | None] = [None] * capacity

    def grow(self, capacity: int) -> None:
        self.states.extend([None] * (capacity - len(self.states)))

    def reset(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():
            self.states[slot] = None

    def advance(self, slots: np.ndarray, values: np.ndarray, ts: np.ndarray) -> Forecasts:
        items = []
        for slot, value, at in zip(slots.tolist(), values.tolist(), ts.tolist(), strict=True):
            state = self.states[slot]
            if state is None:
                state = self.states[slot] = self.forecaster.init_state()
            items.append((state, value, at))
        out = Forecasts.empty(len(slots), self.forecaster.horizon)
        for i, result in enumerate(self.forecaster.step(items)):
            if result is NOT_DUE:
                out.due[i] = False
            elif result is not None:
                out.yhat[i], out.lower[i], out.upper[i] = result
                out.made[i] = True
        return out

    def correct(self, slot: int, value: float, newer: int, replace: bool) -> None:
        state = self.states[slot]
        if state is not None:
            self.forecaster.correct(state, value, newer, replace)

    def to_doc(self, slot: int) -> dict:
        state = self.states[slot]
        return self.forecaster.init_state() if state is None else state

    def to_docs(self, slots: np.ndarray) -> list[dict]:
        return [self.to_doc(slot) for slot in slots.tolist()]

    def from_doc(self, slot: int, doc: dict) -> None:
        self.states[slot] = doc


def interval_rows(forecasts: Forecasts, index: int) -> tuple[list, list, list]:
    """One slot's forecast as the reference's lists (for tests and comparisons)."""
    return (
        forecasts.yhat[index].tolist(),
        forecasts.lower[index].tolist(),
        forecasts.upper[index].tolist(),
    )

"""Sensors mapped to slots, and what the worker remembers of each sensor as columns.

A slot indexes every per-sensor array: here the event-time bookkeeping, in
:mod:`models.columns` the forecasters' windows and recurrent states, in
:mod:`streams.scoring` the pending residuals. Arrays double when full; ``on_grow``
tells the owners of the other arrays.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import numpy as np

from streams.state import RECENT


class SensorSlots:
    """Slot per sensor id, and per slot: latest event time, step, seq, the source record
    of the latest reading, and the times of the latest ``RECENT`` readings.

    A sensor keeps its slot for the life of the process. Its state is *live* from the
    moment it is taken in (restored or fresh) until :meth:`release_all` (partitions
    revoked): the next reading of a released sensor restores it again. What lives in
    memory only (the drift detectors) stays with the slot meanwhile."""

    def __init__(self, capacity: int = 1024, on_grow: Callable[[int], None] | None = None):
        self.capacity = capacity
        self.on_grow = on_grow
        self.slot_of: dict[str, int] = {}
        self.ids: list[str] = []
        self.last_ts = np.full(capacity, np.nan)
        self.step = np.full(capacity, np.nan)
        self.seq = np.zeros(capacity, np.int64)
        self.src_partition = np.full(capacity, -1, np.int64)
        self.src_offset = np.full(capacity, -1, np.int64)
        self.recent = np.full((capacity, RECENT), np.nan)  # oldest first, NaN before
        self.live = np.zeros(capacity, bool)

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, sensor_ids: Sequence[str]) -> tuple[np.ndarray, list[int], list[int]]:
        """The slot of each id; the slots to take in (not live: new or released), and of
        those the ones allocated now."""
        get = self.slot_of.get
        slots = [get(s, -1) for s in sensor_ids]
        allocated: list[int] = []
        if -1 in slots:
            for i, slot in enumerate(slots):
                if slot == -1:
                    slot = self.slot_of.get(sensor_ids[i])
                    if slot is None:
                        slot = self._allocate(sensor_ids[i])
                        allocated.append(slot)
                    slots[i] = slot
        out = np.asarray(slots, np.int64)
        taken = np.unique(out[~self.live[out]]).tolist() if len(out) else []
        self.live[taken] = True
        return out, taken, allocated

    @property
    def live_ids(self) -> list[str]:
        return [self.ids[slot] for slot in np.flatnonzero(self.live[: len(self.ids)]).tolist()]

    def _allocate(self, sensor_id: str) -> int:
        slot = len(self.ids)
        if slot == self.capacity:
            self._grow(self.capacity * 2)
        self.slot_of[sensor_id] = slot
        self.ids.append(sensor_id)
        return slot

    def _grow(self, capacity: int) -> None:
        for name, fill in (
            ("last_ts", np.nan),
            ("step", np.nan),
            ("seq", 0),
            ("src_partition", -1),
            ("src_offset", -1),
            ("recent", np.nan),
            ("live", False),
        ):
            old = getattr(self, name)
            new = np.full((capacity, *old.shape[1:]), fill, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)
        self.capacity = capacity
        if self.on_grow is not None:
            self.on_grow(capacity)

    def release_all(self) -> None:
        """No state is live any more (the slots stay)."""
        self.live[:] = False

    def reset(self, slots: np.ndarray) -> None:
        """Fresh bookkeeping for ``slots``."""
        self.last_ts[slots] = np.nan
        self.step[slots] = np.nan
        self.seq[slots] = 0
        self.src_partition[slots] = -1
        self.src_offset[slots] = -1
        self.recent[slots] = np.nan

    def remember(self, slots: np.ndarray, ts: np.ndarray) -> None:
        """Append one new latest time to each slot's recent times (``slots`` unique)."""
        rows = self.recent[slots]
        rows[:, :-1] = rows[:, 1:]
        rows[:, -1] = ts
        self.recent[slots] = rows

    def recent_row(self, slot: int) -> list[float]:
        row = self.recent[slot]
        return row[~np.isnan(row)].tolist()

    def set_recent(self, slot: int, times: Sequence[float]) -> None:
        times = list(times)[-RECENT:]
        self.recent[slot] = np.nan
        if times:
            self.recent[slot, RECENT - len(times) :] = times

    def place(self, slot: int, ts: float) -> tuple[int, bool] | None:
        """:meth:`streams.state.SensorState.place` on one slot's recent times."""
        recent = self.recent_row(slot)
        if not recent or ts < recent[0]:
            return None
        newer = len(recent) - bisect.bisect_right(recent, ts)
        replace = recent[len(recent) - newer - 1] == ts
        if not replace:
            bisect.insort(recent, ts)
            self.set_recent(slot, recent)
        return newer, replace


def rank_within(slots: np.ndarray) -> np.ndarray:
    """How many earlier entries have the same slot (or key; 0 for the first)."""
    n = len(slots)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((np.arange(n), slots))
    sorted_slots = slots[order]
    starts = np.concatenate([[True], sorted_slots[1:] != sorted_slots[:-1]])
    index = np.arange(n)
    start_of = np.maximum.accumulate(np.where(starts, index, 0))
    out = np.empty(n, np.int64)
    out[order] = index - start_of
    return out

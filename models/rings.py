"""Per-slot arrays that grow, and rings of every slot's latest values (pure numpy)."""

from __future__ import annotations

import numpy as np

from models.base import place


def grown(array: np.ndarray, capacity: int, fill: float = 0) -> np.ndarray:
    """``array`` with room for ``capacity`` rows (the new ones ``fill``)."""
    out = np.full((capacity, *array.shape[1:]), fill, dtype=array.dtype)
    out[: len(array)] = array
    return out


class Ring:
    """The latest ``size`` values of every slot: ``data[slot, pos[slot]]`` is the next
    to be overwritten, ``count`` how many are held (at most ``size``). Each value is
    written twice (at ``pos`` and ``pos + size``), so a full ring, oldest first, is the
    contiguous ``data[slot, pos : pos + size]``: gathering many is one strided copy."""

    def __init__(self, capacity: int, size: int, dtype: type) -> None:
        self.size = size
        self.data = np.zeros((capacity, 2 * size), dtype=dtype)
        self.pos = np.zeros(capacity, np.int64)
        self.count = np.zeros(capacity, np.int64)

    def grow(self, capacity: int) -> None:
        self.data = grown(self.data, capacity)
        self.pos = grown(self.pos, capacity)
        self.count = grown(self.count, capacity)

    def reset(self, slots: np.ndarray) -> None:
        self.pos[slots] = 0
        self.count[slots] = 0

    def push(self, slots: np.ndarray, values: np.ndarray) -> None:
        pos = self.pos[slots]
        self.data[slots, pos] = values
        self.data[slots, pos + self.size] = values
        self.pos[slots] = (pos + 1) % self.size
        self.count[slots] = np.minimum(self.count[slots] + 1, self.size)

    def widen(self, size: int) -> None:
        """Room for ``size`` values per slot (no change if there is); the latest kept."""
        if size <= self.size:
            return
        held = self.count
        index = (self.pos - held)[:, None] + np.arange(self.size)
        latest = np.take_along_axis(self.data, index % self.size, axis=1)
        self.data = np.zeros((len(held), 2 * size), dtype=self.data.dtype)
        self.data[:, : self.size] = latest
        self.data[:, size : size + self.size] = latest
        self.size = size
        self.pos = held % size

    def latest(self, slots: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
        """The latest ``counts`` values of each slot, oldest first."""
        index = (self.pos[slots] - counts)[:, None] + np.arange(self.size)
        rows = np.take_along_axis(self.data[slots], index % self.size, axis=1)
        return [row[:n] for row, n in zip(rows, counts.tolist(), strict=True)]

    def ordered(self, slots: np.ndarray) -> np.ndarray:
        """Full rings of ``slots``, oldest first: (n, size)."""
        windows = np.lib.stride_tricks.sliding_window_view(self.data, self.size, axis=1)
        return windows[slots, self.pos[slots]]

    def row(self, slot: int) -> np.ndarray:
        """One slot's held values, oldest first."""
        count = int(self.count[slot])
        if count < self.size:
            return self.data[slot, :count].copy()
        start = int(self.pos[slot])
        return self.data[slot, start : start + self.size].copy()

    def rows(self, slots: np.ndarray) -> list[np.ndarray]:
        """:meth:`row` of many slots: the full ones gathered at once."""
        full = self.count[slots] == self.size
        out: list[np.ndarray] = [None] * len(slots)  # type: ignore[list-item]
        index = np.flatnonzero(full)
        for i, row in zip(index.tolist(), self.ordered(slots[index]), strict=True):
            out[i] = row
        for i in np.flatnonzero(~full).tolist():
            out[i] = self.row(int(slots[i]))
        return out

    def set_row(self, slot: int, values: np.ndarray) -> None:
        values = values[-self.size :]
        self.data[slot, : len(values)] = values
        self.data[slot, self.size : self.size + len(values)] = values
        self.count[slot] = len(values)
        self.pos[slot] = len(values) % self.size

    def place(self, slot: int, value: float, newer: int, replace: bool) -> None:
        values = self.row(slot).tolist()
        place(values, value, newer, replace, self.size)
        self.set_row(slot, np.asarray(values, dtype=self.data.dtype))

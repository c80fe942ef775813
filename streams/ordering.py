"""Each partition's records exactly in offset order, whatever the consumer delivers (pure).

Faust drops records it has already fetched when a rebalance or a flow stop interrupts a
fetch; when a later offset of that partition then arrives, it counts the records in
between as acknowledged, and the next commit passes over records nobody processed. After
a SIGKILL and restart this skipped 84 records of a partition, for good. So the worker
admits only the next offset of each partition. On a hole it holds back what comes after
it (unacknowledged: nothing is committed past the hole) and has the partition read again
from the first missing offset, every ``retry_after`` seconds while the hole stays open.
A hole still open after ``pass_after`` seconds and several reads is real (compacted
records, transaction markers): it is passed, and the worker logs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Event = TypeVar("Event")
Partition = Hashable  # a topic partition
MIN_READS = 3  # reads of a hole before it may be passed


@dataclass(slots=True)
class Hole:
    expected: int  # the first missing offset
    lowest: int  # the lowest offset seen past it
    opened_at: float
    read_at: float  # when the partition was last read again from ``expected``
    reads: int = 1


@dataclass
class Admission(Generic[Event]):
    admitted: list[Event] = field(default_factory=list)  # process, then acknowledge
    repeated: list[Event] = field(default_factory=list)  # processed already: acknowledge
    held: list[Event] = field(default_factory=list)  # past a hole: neither
    rewind: dict[Partition, int] = field(default_factory=dict)  # read again from here


class OffsetOrder:
    """The next offset expected from each partition, and the holes before it."""

    def __init__(
        self,
        committed: Callable[[Partition], int | None],
        retry_after: float = 1.0,
        pass_after: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.committed = committed  # where a partition starts after an assignment
        self.retry_after = retry_after
        self.pass_after = pass_after
        self.clock = clock
        self.expected: dict[Partition, int] = {}
        self.holes: dict[Partition, Hole] = {}

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Partitions revoked: whoever gets them starts from the committed offset."""
        for partition in partitions:
            self.expected.pop(partition, None)
            self.holes.pop(partition, None)

    def sort(
        self, events: Sequence[Event], position: Callable[[Event], tuple[Partition, int]]
    ) -> Admission[Event]:
        """Sort a batch's events, in order, into admitted, repeated and held."""
        out: Admission[Event] = Admission()
        for event in events:
            partition, offset = position(event)
            expected = self.expected.get(partition)
            if expected is None:
                committed = self.committed(partition)
                expected = self.expected[partition] = offset if committed is None else committed
            if offset == expected:
                self.expected[partition] = offset + 1
                self.holes.pop(partition, None)
                out.admitted.append(event)
            elif offset < expected:
                out.repeated.append(event)
            else:
                out.held.append(event)
                hole = self.holes.get(partition)
                if hole is None:
                    now = self.clock()
                    self.holes[partition] = Hole(expected, offset, now, now)
                    out.rewind[partition] = expected
                else:
                    hole.lowest = min(hole.lowest, offset)
        return out

    def overdue(self) -> tuple[dict[Partition, int], list[tuple[Partition, int, int]]]:
        """Partitions to read again now, and the holes passed as real (partition, first
        and last missing offset)."""
        now = self.clock()
        rewind, passed = {}, []
        for partition, hole in list(self.holes.items()):
            if now - hole.read_at < self.retry_after:
                continue
            if now - hole.opened_at >= self.pass_after and hole.reads >= MIN_READS:
                passed.append((partition, hole.expected, hole.lowest - 1))
                self.expected[partition] = hole.lowest
                del self.holes[partition]
                rewind[partition] = hole.lowest  # what was held back comes again
            else:
                hole.read_at, hole.reads = now, hole.reads + 1
                rewind[partition] = hole.expected
        return rewind, passed

"""Whether a worker makes progress on its partitions (pure: the worker feeds it).

Progress is records taken in, or being caught up with the end of every assigned
partition (an idle stream is not a stall; a partition still being recovered or a broker
that does not answer is not caught up). No progress for ``stall_after`` seconds is a
stall: readiness fails. ``exit_after`` seconds of it is a fault, and so at once is a
partition whose end lies below an offset this worker has already read: the broker lost
its data (tansu with memory storage restarted, a topic deleted and recreated), and the
worker's offsets and per-sensor state no longer describe the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

from forecast.errors import ForecastError

Partition = Hashable


class WorkerStalled(ForecastError):
    """The worker cannot make progress: a restart (by its supervisor) is the remedy."""

    code = "worker_stalled"


@dataclass(frozen=True, slots=True)
class Lost:
    partition: Partition
    end: int  # the partition's end offset now
    reached: int  # the next offset this worker had reached


class Liveness:
    """The time of the last progress, and what stands in its way."""

    def __init__(
        self, stall_after: float, exit_after: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stall_after = stall_after
        self.exit_after = exit_after
        self.clock = clock
        self.progress_at = clock()
        self.cause = ""  # why the latest observation was not progress
        self.reached: dict[Partition, int] = {}  # kept across rebalances: logs only grow

    def took_in(self, positions: Mapping[Partition, int]) -> None:
        """Records were taken in; ``positions``: the next offset per partition they reached."""
        self.progress_at = self.clock()
        for partition, offset in positions.items():
            if offset > self.reached.get(partition, -1):
                self.reached[partition] = offset

    def observe(
        self,
        positions: Mapping[Partition, int | None],
        ends: Mapping[Partition, int] | None,
        *,
        fetched: Mapping[Partition, int | None] | None = None,
        reached: Mapping[Partition, int] | None = None,
        recovering: bool = False,
    ) -> list[Lost]:
        """One probe of the assigned partitions: the next offset to take in of each (None:
        not known), their end offsets as the broker gives them now (None: it did not
        answer), the end each had in the consumer's latest fetch (None: no fetch yet),
        what had been read before those were looked at (:attr:`reached` then), and
        whether Faust is rebalancing or recovering. Returns the partitions whose end lies
        below what this worker had read.

        The fetched ends decide a loss: tansu answers offset requests with less than the
        end after large batches (seen: 7819 for a partition holding 8571 records), and a
        fetch's end never goes back on a log that only grows."""
        reached = self.reached if reached is None else reached
        fetched = fetched or {}
        lost = [
            Lost(p, end, reached[p])
            for p, end in fetched.items()
            if p in positions and end is not None and p in reached and end < reached[p]
        ]
        if lost:
            return lost
        if recovering:
            self.cause = "Faust is rebalancing or recovering its table"
        elif positions and ends is None:
            self.cause = "the broker did not answer for the partitions' end offsets"
        else:
            behind = {}
            for p, position in positions.items():
                end = max((ends or {}).get(p) or 0, fetched.get(p) or 0)
                if position is not None and end > position:
                    behind[p] = end - position
            if not behind:
                self.progress_at = self.clock()
                self.cause = ""
            else:
                self.cause = (
                    f"{sum(behind.values())} records behind on {len(behind)} partitions, "
                    "none taken in"
                )
        return []

    def idle_for(self) -> float:
        """Seconds since the last progress."""
        return max(0.0, self.clock() - self.progress_at)

    def stalled(self) -> bool:
        return self.idle_for() >= self.stall_after

    def expired(self) -> bool:
        return self.idle_for() >= self.exit_after


def describe_loss(lost: list[Lost]) -> str:
    """The fault message for partitions whose data the broker lost."""
    shown = ", ".join(
        f"{_name(x.partition)} ends at offset {x.end}, read up to {x.reached}" for x in lost[:4]
    )
    return (
        f"the broker lost its data: {shown}; the worker's offsets and state no longer match "
        "the log (a broker with memory storage restarted, or a topic was recreated); "
        "restart the worker to start afresh from what the broker holds now"
    )


def _name(partition: Partition) -> str:
    topic, number = getattr(partition, "topic", None), getattr(partition, "partition", None)
    return str(partition) if topic is None else f"{topic}[{number}]"

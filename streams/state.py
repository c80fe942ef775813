"""Per-sensor state: event-time bookkeeping plus each forecaster's own state."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

import orjson

from models.timing import SPACINGS, lower_median

RECENT = 64  # how far back (in readings) a late reading still corrects the forecasters


@dataclass(slots=True)
class SensorState:
    """What the worker remembers about one sensor between readings."""

    last_ts: float | None = None
    step: float | None = None  # the median spacing of the latest readings
    seq: int = 0  # sequence number of the latest published prediction
    models: dict[str, dict] = field(default_factory=dict)  # forecaster name -> its state
    recent: list[float] = field(default_factory=list)  # times of the latest readings
    residuals: dict[str, dict] = field(default_factory=dict)  # model -> waiting steps
    source: tuple[int, int] | None = None  # (partition, offset) of the latest record seen

    def reflects(self, partition: int, offset: int) -> bool:
        """Whether the record at ``offset`` of ``partition`` is already in this state: a
        record delivered again after a crash (the state's snapshot outran the committed
        offsets) is recognised by its offset and skipped, rather than taken for late."""
        return self.source is not None and self.source[0] == partition and offset <= self.source[1]

    def to_bytes(self) -> bytes:
        """A snapshot as JSON (live objects in model states serialise by ``to_json``)."""
        doc = {
            "last_ts": self.last_ts,
            "step": self.step,
            "seq": self.seq,
            "models": self.models,
            "recent": self.recent,
            "residuals": self.residuals,
            "source": self.source,
        }
        return orjson.dumps(doc, default=_plain, option=orjson.OPT_SERIALIZE_NUMPY)

    @classmethod
    def from_bytes(cls, raw: bytes) -> SensorState:
        doc = orjson.loads(raw)
        return cls(
            doc["last_ts"],
            doc["step"],
            doc["seq"],
            doc["models"],
            doc.get("recent", []),
            doc.get("residuals", {}),
            tuple(doc["source"]) if doc.get("source") else None,
        )

    def observe(self, ts: float) -> None:
        """Advance event time to ``ts`` (newer than ``last_ts``). The step is the median
        spacing of the latest readings: a gap (a night, a weekend) is not a step."""
        self.last_ts = ts
        self._remember(ts)
        times = self.recent[-(SPACINGS + 1) :]
        spacings = [later - earlier for earlier, later in itertools.pairwise(times)]
        if spacings:
            self.step = lower_median(spacings)

    def place(self, ts: float) -> tuple[int, bool] | None:
        """Where a late reading at ``ts`` falls: how many remembered readings are newer,
        and whether it repeats one; None if it is older than all that is remembered."""
        if not self.recent or ts < self.recent[0]:
            return None
        newer = len(self.recent) - bisect.bisect_right(self.recent, ts)
        replace = self.recent[len(self.recent) - newer - 1] == ts
        if not replace:
            bisect.insort(self.recent, ts)
            del self.recent[: max(0, len(self.recent) - RECENT)]
        return newer, replace

    def _remember(self, ts: float) -> None:
        self.recent.append(ts)
        if len(self.recent) > RECENT:
            del self.recent[0]


def _plain(value: object) -> object:
    to_json = getattr(value, "to_json", None)
    if to_json is None:
        raise TypeError(f"cannot store {type(value).__name__} in sensor state")
    return to_json()

"""The worker's processing of one micro-batch, over columns (no I/O).

It does what :class:`streams.pipeline.BatchProcessor` (the reference, one object per
reading) does, with the same results (``tests/test_engine.py`` runs both on the same
records), but per batch in numpy and torch:

1. validate every record at once (:func:`streams.validate.parse_records`);
2. admit by array operations: readings already in the state (a redelivery), in order,
   late within the lateness (a correction), or too late (rejected);
3. split the accepted readings into rounds (the k-th reading of each sensor in the
   batch is in round k) and advance every forecaster one round at a time over all the
   round's sensors (:mod:`models.columns`), before any prediction is assembled;
4. per round: match the readings with the steps they complete (:mod:`streams.scoring`),
   feed the drift detectors (:class:`streams.drift.DriftColumns`), choose the production
   forecast or the baseline's, and issue predictions with the next ``seq``;
5. place late readings into the windows where they belong.
Outputs are in the reference's order (batch order).

A sensor's state is restored from its snapshot (``load``) the first time the engine sees
it; :meth:`Engine.snapshot` writes one, :meth:`Engine.release` hands every state back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from forecast import metrics
from forecast.columns import PredictionBlock, ReadingBlock
from forecast.options import DriftConfig
from forecast.schemas import DriftEvent
from forecast.tracing import TRACER
from models.base import ModelSet, StreamingForecaster
from models.columns import (
    SEQUENCE_ROUNDS,
    Forecasts,
    ModelColumns,
    advance_rounds,
    columns_for,
)
from models.online import OnlineConfig
from models.timing import SPACINGS, lower_medians, spacing_rows
from streams.adaptation import AdaptationColumns
from streams.drift import DriftColumns
from streams.pipeline import RawRecord, state_key
from streams.residuals import DEFAULT_HORIZONS
from streams.scoring import ScoreColumns, Scored
from streams.slots import SensorSlots, rank_within
from streams.snapshots import pack
from streams.validate import Limits, Rejection, parse_records

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScoredBatch:
    """The residuals one model key completed in a batch."""

    model: str
    version: int
    scored: Scored


@dataclass(slots=True)
class BatchOutput:
    readings: ReadingBlock | None = None  # stored: accepted and late
    predictions: PredictionBlock | None = None  # published and stored
    shadow: PredictionBlock | None = None  # stored only
    rejected: list[tuple[RawRecord, Rejection]] = field(default_factory=list)
    touched: dict[str, int] = field(default_factory=dict)  # sensor -> partition
    residuals: list[ScoredBatch] = field(default_factory=list)
    drift: list[DriftEvent] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)

    @property
    def published(self) -> int:
        return 0 if self.predictions is None else len(self.predictions)


class Admitted(NamedTuple):
    """The batch's accepted readings (positions into the parsed columns), in order."""

    position: np.ndarray
    slot: np.ndarray
    ts: np.ndarray
    value: np.ndarray
    step: np.ndarray  # NaN for a sensor's first reading
    round: np.ndarray


class Engine:
    """Validates records, advances per-sensor columns and forecasts, for one batch."""

    def __init__(
        self,
        models: Callable[[], ModelSet],
        limits: Limits,
        allowed_lateness: float,
        load: Callable[[str], dict | None],
        clock: Callable[[], float] = time.time,
        horizons: tuple[int, ...] = DEFAULT_HORIZONS,
        drift: DriftConfig | None = None,
        capacity: int = 1024,
        sequence_rounds: int = SEQUENCE_ROUNDS,
        online: OnlineConfig | None = None,
    ) -> None:
        """``sequence_rounds``: from that many rounds in a batch, the LSTM takes each
        sensor's readings in one recurrent pass (the same forecasts up to float rounding).
        ``online``: adapt each served model's forecasts per sensor as their actuals arrive
        (:mod:`streams.adaptation`); None: published as the models make them."""
        self.online_config = online
        self.models = models
        self.sequence_rounds = sequence_rounds
        self.limits = limits
        self.allowed_lateness = allowed_lateness
        self.load = load
        self.clock = clock
        self.horizons = horizons
        self.drift = None if drift is None else DriftColumns(drift, capacity)
        self.slots = SensorSlots(capacity, on_grow=self._grow)
        self.columns: dict[str, ModelColumns] = {}  # model key -> its states
        self.scores: dict[str, ScoreColumns] = {}  # model key -> its pending steps
        self.adaptations: dict[str, AdaptationColumns] = {}  # model key -> its corrections
        self.seconds: Counter = Counter()  # stage -> seconds spent, since the start

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time spent in ``name``, added to :attr:`seconds` (the stage table of the README
        and of ``forecast bench stages``)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    # -- state -------------------------------------------------------------------------

    def _grow(self, capacity: int) -> None:
        for owner in self._owners():
            owner.grow(capacity)

    def _owners(self) -> list:
        """Every holder of per-slot arrays besides the slots themselves."""
        owners = [*self.columns.values(), *self.scores.values(), *self.adaptations.values()]
        return owners if self.drift is None else [*owners, self.drift]

    def _model(self, forecaster: StreamingForecaster) -> ModelColumns:
        key = state_key(forecaster)
        columns = self.columns.get(key)
        if columns is None:
            columns = self.columns[key] = columns_for(forecaster, self.slots.capacity)
        return columns

    def _score(self, key: str) -> ScoreColumns:
        scores = self.scores.get(key)
        if scores is None:
            scores = self.scores[key] = ScoreColumns(self.horizons, capacity=self.slots.capacity)
        return scores

    def _adaptation(self, key: str) -> AdaptationColumns | None:
        if self.online_config is None:
            return None
        adaptation = self.adaptations.get(key)
        if adaptation is None:
            adaptation = AdaptationColumns(self.online_config, self.horizons, self.slots.capacity)
            self.adaptations[key] = adaptation
        return adaptation

    def _serve(self, models: ModelSet) -> None:
        """Forget the states of models that no longer serve (a swap, a rollback)."""
        serving = {state_key(m) for m in models.serving()}
        for key in self.columns.keys() - serving:
            del self.columns[key]
        for key in self.scores.keys() - serving:
            del self.scores[key]
        for key in self.adaptations.keys() - serving:
            del self.adaptations[key]
        for forecaster in models.serving():
            self._model(forecaster)

    def _restore(self, slots: list[int], allocated: list[int]) -> None:
        """Sensors taken in: from their snapshots if any, else fresh; the drift
        detectors (in memory only) start afresh for new slots only."""
        fresh = np.asarray(slots, np.int64)
        self.slots.reset(fresh)
        for owner in (*self.columns.values(), *self.scores.values(), *self.adaptations.values()):
            owner.reset(fresh)
        if self.drift is not None and allocated:
            self.drift.reset(np.asarray(allocated, np.int64))
        for slot in slots:
            doc = self.load(self.slots.ids[slot])
            if doc is not None:
                self._restore_one(slot, doc)

    def _restore_one(self, slot: int, doc: dict) -> None:
        s = self.slots
        s.last_ts[slot] = np.nan if doc.get("last_ts") is None else doc["last_ts"]
        s.step[slot] = np.nan if doc.get("step") is None else doc["step"]
        s.seq[slot] = doc.get("seq", 0)
        source = doc.get("source")
        s.src_partition[slot], s.src_offset[slot] = source if source else (-1, -1)
        s.set_recent(slot, doc.get("recent", []))
        for key, state in doc.get("models", {}).items():
            if key in self.columns:
                self.columns[key].from_doc(slot, state)
        for key, entry in doc.get("residuals", {}).items():
            self._score(key).from_doc(slot, entry)
        for key, entry in doc.get("online", {}).items():
            adaptation = self._adaptation(key)
            if adaptation is not None:
                adaptation.from_doc(slot, entry)

    def snapshot(self, sensor_id: str) -> bytes:
        """A sensor's state (:func:`streams.snapshots.pack` of the document that
        :meth:`streams.state.SensorState.to_bytes` writes as JSON)."""
        return self.snapshots([sensor_id])[0]

    def snapshots(self, sensor_ids: list[str]) -> list[bytes]:
        """:meth:`snapshot` of many sensors, their arrays gathered at once."""
        if not sensor_ids:
            return []
        s = self.slots
        slots = np.asarray([s.slot_of[sensor_id] for sensor_id in sensor_ids], np.int64)
        models = {key: columns.to_docs(slots) for key, columns in self.columns.items()}
        scores = {key: scores.to_docs(slots) for key, scores in self.scores.items()}
        online = {key: adapted.to_docs(slots) for key, adapted in self.adaptations.items()}
        recent = s.recent[slots]
        out = []
        for i, (last_ts, step, seq, partition, offset) in enumerate(
            zip(
                s.last_ts[slots].tolist(),
                s.step[slots].tolist(),
                s.seq[slots].tolist(),
                s.src_partition[slots].tolist(),
                s.src_offset[slots].tolist(),
                strict=True,
            )
        ):
            doc = {
                "last_ts": None if math.isnan(last_ts) else last_ts,
                "step": None if math.isnan(step) else step,
                "seq": seq,
                "models": {key: docs[i] for key, docs in models.items()},
                "recent": recent[i][~np.isnan(recent[i])],
                "residuals": {key: docs[i] for key, docs in scores.items()},
                "online": {key: docs[i] for key, docs in online.items()},
                "source": None if partition < 0 else [partition, offset],
            }
            out.append(pack(doc))
        return out

    def release(self) -> dict[str, bytes]:
        """Every live state as a snapshot; none is live any more (partitions revoked)."""
        ids = self.slots.live_ids
        out = dict(zip(ids, self.snapshots(ids), strict=True))
        self.slots.release_all()
        return out

    def online(self, sensor_ids: set[str]) -> list[tuple[str, str, str, float, float, int]]:
        """(sensor, model, horizon, MAE, coverage, residuals) for each scored step of
        ``sensor_ids``."""
        known = [(s, self.slots.slot_of[s]) for s in sensor_ids if s in self.slots.slot_of]
        if not known:
            return []
        slots = np.asarray([slot for _, slot in known], np.int64)
        out = []
        for key, scores in self.scores.items():
            name = key.rsplit("@", 1)[0]
            mae, coverage, counts = scores.online(slots)
            for i, j in zip(*np.nonzero(counts), strict=True):
                horizon = str(self.horizons[j])
                scored = int(counts[i, j])
                out.append(
                    (known[i][0], name, horizon, float(mae[i, j]), float(coverage[i, j]), scored)
                )
        return out

    # -- a batch ---------------------------------------------------------------------

    def process(self, records: list[RawRecord]) -> BatchOutput:
        out = BatchOutput()
        now = self.clock()
        models = self.models()
        self._serve(models)
        with TRACER.start_as_current_span("ingest") as span:
            with self.stage("validate"):
                parsed = parse_records([r.value for r in records], self.limits, now)
            with self.stage("admit"):
                late_rejected: list[tuple[int, int, Rejection]] = []
                slots, taken, allocated = self.slots.lookup(parsed.sensor_id)
                if taken:
                    self._restore(taken, allocated)
                admitted, late = self._admit(records, parsed, slots, out, late_rejected)
                out.rejected = _in_record_order(records, parsed.rejections, late_rejected)
            span.set_attribute("readings.accepted", len(admitted.position))
            span.set_attribute("readings.rejected", len(out.rejected))
        if len(admitted.position):
            self._forecast(admitted, parsed, models, out, now)
        if len(late):
            with TRACER.start_as_current_span("features.corrections"), self.stage("corrections"):
                self._correct(late, slots, parsed.ts, parsed.value, models, out)
        return out

    def _admit(self, records, parsed, slots, out, late_rejected) -> tuple[Admitted, np.ndarray]:
        """Classify every reading by event time, as the reference does one by one."""
        s = self.slots
        record = parsed.record
        partition = np.fromiter(
            (records[i].partition for i in record.tolist()), np.int64, len(record)
        )
        offset = np.fromiter((records[i].offset for i in record.tolist()), np.int64, len(record))
        ts = parsed.ts
        redelivered = (s.src_partition[slots] == partition) & (offset <= s.src_offset[slots])
        out.outcomes["redelivered"] += int(redelivered.sum())
        live = np.flatnonzero(~redelivered)
        if len(live) == 0:
            empty = np.zeros(0, np.int64)
            return Admitted(
                empty, empty, empty.astype(float), empty.astype(float), empty.astype(float), empty
            ), empty
        live_slots = slots[live]
        before = _previous_max(live_slots, ts[live], s.last_ts[live_slots])
        newest = np.isnan(before) | (ts[live] > before)
        within = ~newest & (ts[live] >= before - self.allowed_lateness)
        too_late = ~newest & ~within
        for j in np.flatnonzero(too_late).tolist():
            i = live[j]
            detail = f"{before[j] - ts[i]:.0f}s older than the latest reading"
            late_rejected.append((int(record[i]), i, Rejection("late", detail)))
        repeat = within & (ts[live] == before)
        out.outcomes["accepted"] += int(newest.sum())
        out.outcomes["duplicate"] += int(repeat.sum())
        out.outcomes["out_of_order"] += int((within & ~repeat).sum())
        stored = live[newest | within]
        out.readings = self._stored(parsed, stored) if len(stored) else None
        # The source of each touched sensor: its last record not redelivered (late
        # rejections count) on the partition of its last stored reading.
        last_offset = _last_per_slot(live_slots, offset[live])
        touched_slots = slots[stored]
        last_partition = _last_per_slot(touched_slots, partition[stored])
        for slot, part in last_partition.items():
            s.src_partition[slot] = part
            s.src_offset[slot] = last_offset[slot]
            out.touched[s.ids[slot]] = part
        accepted = live[newest]
        acc_slots = slots[accepted]
        acc_ts = ts[accepted]
        step = np.full(len(accepted), np.nan)  # as of each reading: _observe_times
        rounds = rank_within(acc_slots)
        admitted = Admitted(accepted, acc_slots, acc_ts, parsed.value[accepted], step, rounds)
        self._observe_times(admitted)
        return admitted, live[within]

    def _observe_times(self, a: Admitted) -> None:
        """Event time advances: latest time, recent times and step of each sensor (the
        median spacing of its latest readings, as ``SensorState.observe``)."""
        s = self.slots
        for k in range(int(a.round.max()) + 1 if len(a.round) else 0):
            at = np.flatnonzero(a.round == k)
            slots = a.slot[at]
            s.last_ts[slots] = a.ts[at]
            s.remember(slots, a.ts[at])
            step = lower_medians(spacing_rows(s.recent[slots, -(SPACINGS + 1) :]))
            step = np.where(np.isnan(step), s.step[slots], step)
            s.step[slots] = a.step[at] = step

    @staticmethod
    def _stored(parsed, stored: np.ndarray) -> ReadingBlock:
        ids = parsed.sensor_id
        covariates = parsed.covariates
        return ReadingBlock(
            [ids[i] for i in stored.tolist()],
            parsed.ts[stored],
            parsed.value[stored],
            None if covariates is None else [covariates[i] for i in stored.tolist()],
        )

    # -- forecasting ------------------------------------------------------------------

    def _forecast(
        self, a: Admitted, parsed, models: ModelSet, out: BatchOutput, now: float
    ) -> None:
        rounds = [np.flatnonzero(a.round == k) for k in range(int(a.round.max()) + 1)]
        base = self._run(models.baseline, a, rounds)
        main = failed = None
        if models.production is not None:
            main = self._run(models.production, a, rounds)
            failed = main is None
        shadow = self._run(models.shadow, a, rounds) if models.shadow is not None else None
        made: list[tuple[np.ndarray, PredictionBlock]] = []
        shadows: list[tuple[np.ndarray, PredictionBlock]] = []
        drift: list[tuple[int, DriftEvent]] = []
        with TRACER.start_as_current_span("features"):  # residuals, drift, predictions
            for k, at in enumerate(rounds):
                with self.stage("residuals"):
                    one_step = self._score_round(a, at, parsed, out)
                with self.stage("drift"):
                    drift += self._drift_round(a, at, parsed, one_step)
                with self.stage("assemble"):
                    main_k = None if main is None else main[k]
                    chosen = self._choose(a, at, base[k], main_k, bool(failed), models, out, now)
                    if chosen is not None:
                        made.append(chosen)
                    if shadow is not None:
                        issued = self._shadow(a, at, shadow[k], models.shadow, now)
                        if issued is not None:
                            shadows.append(issued)
        out.predictions = _ordered(made, "production")
        out.shadow = _ordered(shadows, "shadow")
        out.drift = [event for _, event in sorted(drift, key=lambda item: item[0])]

    def _run(
        self, forecaster: StreamingForecaster, a: Admitted, rounds: list[np.ndarray]
    ) -> list[Forecasts] | None:
        """One forecaster over every round; None if it failed (the baseline serves)."""
        columns = self._model(forecaster)
        started = time.perf_counter()
        attributes = {"model": forecaster.name, "model.version": forecaster.version}
        with (
            TRACER.start_as_current_span("inference", attributes=attributes),
            self.stage(f"model {forecaster.name}"),
        ):
            try:
                results = advance_rounds(
                    columns, a.slot, a.value, a.ts, rounds, self.sequence_rounds
                )
            except Exception:  # a model bug must not stop the stream: fall back and count it
                log.exception("forecaster %s v%s failed", forecaster.name, forecaster.version)
                return None
        metrics.INFERENCE_SECONDS.labels(forecaster.name).observe(time.perf_counter() - started)
        metrics.INFERENCE_READINGS.labels(forecaster.name).observe(len(a.position))
        return results

    def _score_round(self, a: Admitted, at: np.ndarray, parsed, out: BatchOutput):
        """Residuals the round's readings complete; returns the one-step production
        error per reading of the round (NaN where none) and its model key."""
        error = np.full(len(at), np.nan)
        source = np.full(len(at), -1, np.int64)
        keys = list(self.scores)
        for number, key in enumerate(keys):
            scored = self.scores[key].observe(a.slot[at], a.ts[at], a.value[at])
            if not len(scored):
                continue
            adaptation = self._adaptation(key)
            if adaptation is not None:
                adaptation.learn(a.slot[at], scored)
            name, version = key.rsplit("@", 1)
            out.residuals.append(ScoredBatch(name, int(version), _reindex(scored, a.position[at])))
            production = np.asarray(scored.stage_names)[scored.stage] == "production"
            pick = np.flatnonzero((scored.horizon == 1) & production)
            rows, first = np.unique(scored.index[pick], return_index=True)  # FIFO order
            pick = pick[first]
            free = source[rows] < 0
            error[rows[free]] = scored.error[pick[free]]
            source[rows[free]] = number
        return error, source, keys

    def _drift_round(
        self, a: Admitted, at: np.ndarray, parsed, one_step
    ) -> list[tuple[int, DriftEvent]]:
        """The round's drift events, keyed by the reading's position in the batch."""
        if self.drift is None:
            return []
        error, source, keys = one_step
        names = [key.rsplit("@", 1) for key in keys] + [("", "0")]  # source -1: the last
        models = np.asarray([name for name, _ in names])[source]
        versions = np.asarray([int(version) for _, version in names], np.int64)[source]
        positions = a.position[at]
        events = self.drift.observe(
            a.slot[at],
            _Picked(parsed.sensor_id, positions),
            a.ts[at],
            a.value[at],
            error,
            models,
            versions,
        )
        return [(int(positions[i]), event) for i, event in events]

    def _choose(
        self,
        a: Admitted,
        at: np.ndarray,
        base: Forecasts,
        main: Forecasts | None,
        failed: bool,
        models: ModelSet,
        out: BatchOutput,
        now: float,
    ) -> tuple[np.ndarray, PredictionBlock] | None:
        """The production forecast where usable, else the baseline's (counted)."""
        step = a.step[at]
        issue = ~np.isnan(step)  # the step needs two readings
        if main is not None:
            issue &= main.due  # a cadence skips readings
        use_main = np.zeros(len(at), bool)
        if models.production is not None:
            if main is not None:
                use_main = main.usable
            fallback = issue & ~use_main
            if fallback.any():
                reason = "warming_up" if main is not None else "failed"
                if main is not None:
                    out.fallbacks["warming_up"] += int((fallback & ~main.made).sum())
                    out.fallbacks["failed"] += int((fallback & main.made).sum())
                else:
                    out.fallbacks[reason] += int(fallback.sum())
        use_base = issue & ~use_main & base.usable
        out.outcomes["forecast_failed"] += int((issue & ~use_main & ~base.usable).sum())
        rows = np.flatnonzero(issue & (use_main | use_base))
        if len(rows) == 0:
            return None
        slots = a.slot[at][rows]
        self.slots.seq[slots] += 1
        pick_main = use_main[rows]
        yhat = np.where(pick_main[:, None], _or(main, "yhat", rows), base.yhat[rows])
        lower = np.where(pick_main[:, None], _or(main, "lower", rows), base.lower[rows])
        upper = np.where(pick_main[:, None], _or(main, "upper", rows), base.upper[rows])
        for forecaster, mask in ((models.production, pick_main), (models.baseline, ~pick_main)):
            adaptation = None if forecaster is None else self._adaptation(state_key(forecaster))
            if adaptation is not None and mask.any():
                corrected = adaptation.apply(slots[mask], yhat[mask], lower[mask], upper[mask])
                yhat[mask], lower[mask], upper[mask] = corrected
        main_model = models.baseline if models.production is None else models.production
        served = (models.baseline, main_model)  # indexed by pick_main
        pick = pick_main.astype(np.intp)
        block = PredictionBlock(
            list(map(self.slots.ids.__getitem__, slots.tolist())),
            a.ts[at][rows],
            now,
            np.asarray([f.name for f in served], object)[pick].tolist(),
            np.asarray([f.version for f in served], np.int64)[pick],
            step[rows],
            yhat,
            lower,
            upper,
            self.slots.seq[slots].copy(),
        )
        for forecaster, mask in ((models.production, pick_main), (models.baseline, ~pick_main)):
            if forecaster is not None and mask.any():
                self._score(state_key(forecaster)).expect(
                    slots[mask],
                    block.ts[mask],
                    block.step_seconds[mask],
                    yhat[mask],
                    lower[mask],
                    upper[mask],
                    "production",
                )
        return a.position[at][rows], block

    def _shadow(
        self,
        a: Admitted,
        at: np.ndarray,
        forecasts: Forecasts,
        model: StreamingForecaster,
        now: float,
    ) -> tuple[np.ndarray, PredictionBlock] | None:
        rows = np.flatnonzero(forecasts.usable & ~np.isnan(a.step[at]))
        if len(rows) == 0:
            return None
        slots = a.slot[at][rows]
        yhat, lower, upper = forecasts.yhat[rows], forecasts.lower[rows], forecasts.upper[rows]
        adaptation = self._adaptation(state_key(model))
        if adaptation is not None:
            yhat, lower, upper = adaptation.apply(slots, yhat, lower, upper)
        block = PredictionBlock(
            [self.slots.ids[slot] for slot in slots.tolist()],
            a.ts[at][rows],
            now,
            [model.name] * len(rows),
            np.full(len(rows), model.version, np.int64),
            a.step[at][rows],
            yhat,
            lower,
            upper,
            self.slots.seq[slots].copy(),
            "shadow",
        )
        self._score(state_key(model)).expect(
            slots, block.ts, block.step_seconds, block.yhat, block.lower, block.upper, "shadow"
        )
        return a.position[at][rows], block

    # -- late readings ------------------------------------------------------------------

    def _correct(self, late, slots, ts, values, models: ModelSet, out: BatchOutput) -> None:
        """Place late readings into the windows of every serving model."""
        serving = [self.columns[state_key(m)] for m in models.serving()]
        for i in late.tolist():
            slot = int(slots[i])
            where = self.slots.place(slot, float(ts[i]))
            if where is None:
                out.outcomes["too_old_to_correct"] += 1
                continue
            for columns in serving:
                columns.correct(slot, float(values[i]), *where)


def _maybe(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _or(forecasts: Forecasts | None, name: str, rows: np.ndarray) -> np.ndarray:
    if forecasts is None:
        return np.zeros((len(rows), 1))
    return getattr(forecasts, name)[rows]


def _ordered(made: list[tuple[np.ndarray, PredictionBlock]], stage: str) -> PredictionBlock | None:
    """The round blocks as one block in batch order."""
    block = PredictionBlock.concat([b for _, b in made], stage)
    if block is None or len(made) == 1:
        return block
    order = np.argsort(np.concatenate([p for p, _ in made]), kind="stable")
    return block.take(order)


def _reindex(scored: Scored, positions: np.ndarray) -> Scored:
    """Residuals indexed by the reading's position in the batch, not in the round."""
    return Scored(
        positions[scored.index],
        scored.horizon,
        scored.target_ts,
        scored.actual,
        scored.yhat,
        scored.lower,
        scored.upper,
        scored.stage,
        scored.stage_names,
    )


def _previous_max(slots: np.ndarray, ts: np.ndarray, last_ts: np.ndarray) -> np.ndarray:
    """For each reading, the latest time its sensor had seen before it: the state's, or
    an earlier reading's of the batch (NaN if none)."""
    n = len(slots)
    order = np.lexsort((np.arange(n), slots))  # by sensor, then batch order
    sorted_slots = slots[order]
    values, rank = np.unique(ts[order], return_inverse=True)
    segment = np.concatenate([[0], np.cumsum(sorted_slots[1:] != sorted_slots[:-1])])
    key = segment * (len(values) + 1) + rank + 1
    running = np.maximum.accumulate(key)
    first = np.concatenate([[True], sorted_slots[1:] != sorted_slots[:-1]])
    earlier = np.where(first, 0, np.concatenate([[0], running[:-1]]))
    earlier_rank = earlier - segment * (len(values) + 1) - 1  # -1: none in the batch
    batch_max = np.where(earlier_rank >= 0, values[np.maximum(earlier_rank, 0)], np.nan)
    out = np.empty(n)
    out[order] = np.fmax(batch_max, last_ts[order])
    return out


def _last_per_slot(slots: np.ndarray, values: np.ndarray) -> dict[int, int]:
    """The last value per slot, in order."""
    return dict(zip(slots.tolist(), values.tolist(), strict=True))


def _in_record_order(
    records, parsed: list[tuple[int, Rejection]], late: list[tuple[int, int, Rejection]]
):
    """Rejections as the reference lists them: per record, its parse rejections, then its
    late readings."""
    keyed = [((r, 0, n), rejection) for n, (r, rejection) in enumerate(parsed)]
    keyed += [((r, 1, i), rejection) for r, i, rejection in late]
    keyed.sort(key=lambda item: item[0])
    return [(records[key[0]], rejection) for key, rejection in keyed]


class _Picked(Sequence[str]):
    """``values[positions[i]]`` for each ``i``, looked up only when asked (the drift
    detectors need a reading's sensor id only for the rare reading that drifts)."""

    def __init__(self, values: Sequence[str], positions: np.ndarray) -> None:
        self.values, self.positions = values, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]  # no slices
        return self.values[int(self.positions[i])]

"""The closed loop: drift → retrain in the background → shadow → compare → promote or not.

Policy: when drift events (residual or level) come from at least ``retrain_sensors``
distinct sensors within ``retrain_window`` seconds of sensor time (so a replay at any
speed behaves like the live stream), and no retraining started in the last
``retrain_cooldown`` seconds of wall time, the production model's kind and parameters are trained
again on the latest ``retrain_history`` seconds (sensor time) of readings from
ClickHouse. Training runs as a separate ``forecast train`` process at low priority, so
the stream never waits for it; the new version enters as shadow. Shadow and production
are then compared on the same live residuals (same sensors, times and steps, from the
``forecast_errors`` view): once there are ``compare_residuals`` pairs, the shadow is
promoted only if its MAE is lower by at least ``compare_margin``; otherwise it is
retired. Each step is logged and stored in ``model_decisions``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pandas as pd
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from forecast import metrics
from forecast.errors import ForecastError
from forecast.schemas import DriftEvent
from forecast.settings import Settings
from models.registry import ModelRef, Registry
from sinks.clickhouse import Store

log = logging.getLogger(__name__)
RECENT_EVENTS = 10_000  # triggering drift events kept for the policy, at most
PARTITIONS_TIMEOUT = 60.0  # seconds the drift listener waits for its topic's partitions

KINDS = {"linear-lstm": "lstm", "tft": "tft"}
TRIGGERING = ("residual", "level")


class DriftListener:
    """Every drift event on `drift-events`, from every worker, handed to ``notice``: the
    one retraining loop runs where the store is (with the sink), whichever worker
    detected the drift. Reads all partitions from their end at start, with no group."""

    def __init__(
        self, settings: Settings, bootstrap: str, notice: Callable[[list[DriftEvent]], None]
    ) -> None:
        self.topic = settings.topic("drift-events")
        self.notice = notice
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None
        )
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.consumer.start()
        ids = await self._partitions()
        partitions = [TopicPartition(self.topic, p) for p in sorted(ids)]
        self.consumer.assign(partitions)
        await self.consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the positions now: nothing published later is missed
            await self.consumer.position(tp)
        self._task = asyncio.create_task(self._run(), name="drift-listener")

    async def _partitions(self) -> set[int]:
        """The topic's partitions, once the broker's metadata names them: a listener
        assigned none would hear nothing, for good (seen on a loaded machine, where the
        metadata of a topic created a moment before had no partitions yet)."""
        waited = 0.0
        while True:
            await self.consumer.topics()  # the whole cluster's metadata, fetched now
            ids = self.consumer.partitions_for_topic(self.topic)
            if ids:
                return ids
            if waited >= PARTITIONS_TIMEOUT:
                raise ForecastError(f"topic {self.topic} has no partitions after {waited:.0f}s")
            if waited and waited % 5 < 0.25:
                log.warning("drift listener: waiting for the partitions of %s", self.topic)
            await asyncio.sleep(0.25)
            waited += 0.25

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()

    async def _run(self) -> None:
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=500, max_records=5000)
            except KafkaError as exc:
                log.warning("drift listener: %s", exc)
                await asyncio.sleep(1.0)
                continue
            events = []
            for records in batches.values():
                for record in records:
                    try:
                        events.append(DriftEvent.from_message(orjson.loads(record.value or b"")))
                    except (ValueError, KeyError, TypeError) as exc:
                        log.error("drift listener: unreadable event: %s", exc)
            if events:
                self.notice(events)


class Retrainer:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: Registry,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.clock = clock
        # (event time, sensor) of the triggering events since the last retraining, in
        # arrival order: the workers' events interleave, each worker at its own pace
        self.recent: collections.deque[tuple[float, str]] = collections.deque(maxlen=RECENT_EVENTS)
        self.last_run: float | None = None
        self.training: asyncio.Task | None = None
        self.candidate: tuple[ModelRef, ModelRef] | None = None  # (shadow, production)
        # told every decision once stored (webhooks); called from a thread
        self.on_decision: Callable[[str, str, int, dict], None] | None = None

    # -- policy ------------------------------------------------------------------------

    def notice(self, events: list[DriftEvent]) -> None:
        """Called with the drift events as they arrive (never blocks). They may span days
        of a replay: they count in their time order."""
        for event in sorted(events, key=lambda e: e.ts):
            if event.signal not in TRIGGERING:
                continue
            self.recent.append((event.ts, event.sensor_id))
            sensors = self._window_around(event.ts)
            now = self.clock()
            if len(sensors) >= self.settings.retrain_sensors and self._due(now):
                self.recent.clear()
                self.last_run = now
                self.training = asyncio.get_running_loop().create_task(
                    self.retrain(sorted(sensors)), name="retrain"
                )

    def _window_around(self, ts: float) -> set[str]:
        """The most distinct sensors with an event in one window of ``retrain_window``
        seconds that holds ``ts``, whatever order the events arrived in (one worker may be
        days of sensor time ahead of another in a replay)."""
        width = self.settings.retrain_window
        near = sorted((t, s) for t, s in self.recent if abs(t - ts) <= width)
        best: set[str] = set()
        inside: collections.Counter[str] = collections.Counter()
        low = 0
        for t, sensor in near:  # windows ending at each event: two pointers over the times
            inside[sensor] += 1
            while near[low][0] < t - width:
                gone = near[low][1]
                inside[gone] -= 1
                if not inside[gone]:
                    del inside[gone]
                low += 1
            if t >= ts and near[low][0] <= ts and len(inside) > len(best):
                best = set(inside)
        return best

    def _due(self, now: float) -> bool:
        if self.training is not None and not self.training.done():
            return False
        if self.candidate is not None:
            return False  # a challenger is still being compared
        cooling = self.last_run is not None and now - self.last_run < self.settings.retrain_cooldown
        return not cooling

    # -- retraining --------------------------------------------------------------------

    async def retrain(self, sensors: list[str]) -> None:
        decide = functools.partial(asyncio.to_thread, self._decide)
        production = await asyncio.to_thread(self.registry.stage, "production")
        if production is None:
            await decide("skipped", "", 0, {"sensors": sensors, "why": "no production model"})
            return
        name = production.name
        meta = await asyncio.to_thread(self.registry.meta, name, production.version)
        await decide("triggered", name, production.version, {"sensors": sensors})
        try:
            data = await asyncio.to_thread(self._export)
            version = await self._train(name, meta, data)
        except ForecastError as exc:
            await decide("failed", name, production.version, {"error": exc.message})
            return
        trained = await asyncio.to_thread(self.registry.meta, name, version)
        detail = {"metrics": trained["metrics"], "rows": trained["data"]["rows"]}
        await decide("trained", name, version, {**detail, "stage": "shadow"})
        self.candidate = (ModelRef(name, version), production)

    def _export(self) -> Path:
        """The latest readings of every sensor as a wide CSV (time, one column each)."""
        rows = self.store.query(
            "SELECT ts, sensor_id, value FROM forecast.readings WHERE ts >= "
            "(SELECT max(ts) FROM forecast.readings) - toIntervalSecond({history:UInt64}) "
            "ORDER BY ts",
            {"history": int(self.settings.retrain_history)},
        )
        if not rows:
            raise ForecastError("no readings to retrain on")
        frame = pd.DataFrame(rows, columns=["ts", "sensor_id", "value"])
        wide = frame.pivot_table(index="ts", columns="sensor_id", values="value").dropna()
        folder = self.settings.data_dir / "retrain"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"readings-{int(time.time())}.csv"
        wide.to_csv(path, index_label="date")
        return path

    async def _train(self, name: str, meta: dict, data: Path) -> int:
        params = meta["params"]
        kind = KINDS[meta["kind"]]
        args = [
            "train",
            "--data",
            str(data),
            "--model",
            kind,
            "--name",
            name,
            "--promote",
            "shadow",
            "--horizon",
            str(params["horizon"]),
            "--lookback",
            str(params["lookback"]),
            "--hidden",
            str(params["hidden"]),
            "--epochs",
            str(self.settings.retrain_epochs),
            "--seed",
            str(params.get("seed", 0)),
        ]
        result = data.with_suffix(".result.json")
        args += ["--result", str(result)]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "forecast",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=lambda: os.nice(10),  # the stream comes first
        )
        try:
            _, err = await process.communicate()
        except asyncio.CancelledError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise ForecastError(f"training exited {process.returncode}: {tail[0]}")
        try:
            return int(orjson.loads(result.read_bytes())["version"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ForecastError(f"training left no result in {result}: {exc}") from None

    async def stop(self) -> None:
        """Stop a training still running (its process too); the stream is stopping."""
        if self.training is not None and not self.training.done():
            self.training.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.training

    # -- comparison --------------------------------------------------------------------

    async def run(self, interval: float = 2.0) -> None:
        """Compare a challenger whenever there is one."""
        while True:
            await asyncio.sleep(interval)
            if self.candidate is not None:
                try:
                    await asyncio.to_thread(self.compare)
                except ForecastError as exc:
                    log.warning("comparison postponed: %s", exc.message)

    def compare(self) -> bool:
        """Decide once both models have enough paired residuals; True if decided."""
        assert self.candidate is not None
        shadow, production = self.candidate
        pairs, shadow_mae, production_mae = self.store.query(
            """SELECT count(), avg(abs(s.error)), avg(abs(p.error)) FROM
               (SELECT sensor_id, ts, horizon, error FROM forecast.forecast_errors
                WHERE model = {sm:String} AND model_version = {sv:UInt32}) AS s
               INNER JOIN
               (SELECT sensor_id, ts, horizon, error FROM forecast.forecast_errors
                WHERE model = {pm:String} AND model_version = {pv:UInt32}) AS p
               USING (sensor_id, ts, horizon)""",
            {
                "sm": shadow.name,
                "sv": shadow.version,
                "pm": production.name,
                "pv": production.version,
            },
        )[0]
        if pairs < self.settings.compare_residuals:
            return False
        detail = {
            "pairs": pairs,
            "shadow_mae": round(shadow_mae, 6),
            "production_mae": round(production_mae, 6),
            "production_version": production.version,
            "margin": self.settings.compare_margin,
        }
        self._decide("compared", shadow.name, shadow.version, detail)
        if shadow_mae < production_mae * (1 - self.settings.compare_margin):
            self.registry.promote(shadow.name, shadow.version, "production")
            self._decide("promoted", shadow.name, shadow.version, detail)
        else:
            self.registry.retire("shadow")
            self._decide("kept", production.name, production.version, detail)
        self.candidate = None
        return True

    def _decide(self, action: str, model: str, version: int, detail: dict) -> None:
        log.info("retraining loop: %s %s v%s", action, model, version, extra={"detail": detail})
        metrics.RETRAINS.labels(action).inc()
        try:
            self.store.write_decision(action, model, version, detail)
        except ForecastError as exc:  # the log line above keeps the decision
            log.error("could not store the decision %s: %s", action, exc.message)
        if self.on_decision is not None:
            try:
                self.on_decision(action, model, version, detail)
            except Exception:  # a listener's fault never stops the loop
                log.exception("decision listener failed on %s", action)

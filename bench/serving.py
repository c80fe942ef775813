"""What the benchmarks share: settings on a fresh data directory, the models that serve
(a trained LSTM, cached between runs; a TFT shadow), the readings they produce, and what
the worker published.

The LSTM is trained the way ``forecast train`` trains it (:func:`models.fit.fit` on a
wide CSV, ETTh1 by default), once per configuration: the artifact is kept in a cache
folder (``~/.cache/forecast-bench`` unless told) under a name that hashes the
configuration and the data, and registered and promoted to production in each bench's
fresh registry before its worker starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import orjson
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from forecast import metrics
from forecast.errors import ForecastError
from forecast.runtime import Failing
from forecast.settings import Settings, load_settings
from models.registry import Registry

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ett" / "ETTh1.csv"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "forecast-bench"
LOOKBACK, HORIZON, HIDDEN = 336, 24, 64
STEP = 3600.0  # hourly readings, as the LSTM was trained on
START = 472_222 * STEP  # 2023-11-14 22:00 UTC, on the hour

Say = Callable[[str], None]
T = TypeVar("T")
Record = tuple[bytes, bytes, int]  # key, value, readings in it


@dataclass(frozen=True)
class LstmPlan:
    """How the production LSTM is trained (or found in the cache)."""

    data: Path = DEFAULT_DATA
    epochs: int = 3
    cache: Path = DEFAULT_CACHE
    lookback: int = LOOKBACK
    horizon: int = HORIZON
    hidden: int = HIDDEN
    seed: int = 0

    def options(self) -> dict:
        return {
            "lookback": self.lookback,
            "horizon": self.horizon,
            "hidden": self.hidden,
            "epochs": self.epochs,
            "seed": self.seed,
        }

    def path(self) -> Path:
        """The cache file: the configuration and the data's checksum, hashed."""
        data = hashlib.sha256(self.data.read_bytes()).hexdigest()
        key = orjson.dumps({**self.options(), "data": data}, option=orjson.OPT_SORT_KEYS)
        digest = hashlib.sha256(key).hexdigest()[:12]
        return self.cache / f"lstm-{self.lookback}-{self.horizon}-{digest}.pt"


@dataclass
class Served:
    """The artifacts to register: production LSTM and shadow TFT, each (artifact, meta);
    none of them: the baseline serves alone."""

    lstm: tuple[dict, dict] | None = None
    tft: tuple[dict, dict] | None = None

    @property
    def kind(self) -> str:
        return "lstm" if self.lstm else "baseline"

    @property
    def window(self) -> int:
        """Readings a sensor needs before the production model serves."""
        return self.lstm[0]["config"]["lookback"] if self.lstm else 24

    def describe(self) -> str:
        if not self.lstm:
            return "models: the seasonal-naive baseline alone (--model baseline)"
        config = self.lstm[0]["config"]
        line = (
            f"models: lstm (lookback {config['lookback']}, horizon {config['horizon']}, "
            f"{self.lstm[1]['best_epoch']} of {config['epochs']} epochs, test mse "
            f"{self.lstm[1]['metrics']['test']['mse']:.3f}) in production, "
            "seasonal-naive baseline as fallback"
        )
        if self.tft:
            tft = self.tft[0]["config"]
            line += f", tft (encoder {tft['lookback']}, cadence {tft['cadence']}) as shadow"
        return line + "; residuals and drift on"


def trained_lstm(plan: LstmPlan, say: Say) -> tuple[dict, dict]:
    """The LSTM's artifact and metadata: from the cache, or trained now and cached."""
    path = plan.path()
    if path.exists():
        cached = torch.load(path, weights_only=True)
        say(f"lstm: cached {path}")
        return cached["artifact"], cached["meta"]
    from models.data import load_wide_csv
    from models.fit import configure, fit

    config = configure("lstm", **plan.options())
    series = load_wide_csv(plan.data)
    say(f"lstm: training on {plan.data} ({len(series.values)} rows), {plan.epochs} epochs")
    started = time.perf_counter()

    def progress(epoch: int, row: dict) -> None:
        took = time.perf_counter() - started
        mse = row["valid_mse"]
        say(f"lstm: epoch {epoch}/{plan.epochs}, validation mse {mse:.4f}, {took:.0f}s")

    fitted = fit("lstm", series, config, progress)
    fitted.meta["data"]["file"] = str(plan.data)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"artifact": fitted.artifact, "meta": fitted.meta}, partial)
    os.replace(partial, path)
    say(f"lstm: trained in {time.perf_counter() - started:.0f}s, cached as {path}")
    return fitted.artifact, fitted.meta


def untrained_tft(cadence: int) -> tuple[dict, dict]:
    """A TFT of the serving shape with fresh weights (memory does not depend on them)."""
    from models.tft import TFTConfig, build_network

    config = TFTConfig(horizon=HORIZON, cadence=cadence)
    net = build_network(config)
    artifact = {"kind": "tft", "config": asdict(config), "state_dict": net.state_dict()}
    meta = {"kind": "tft", "params": asdict(config), "metrics": {}, "untrained": True}
    return artifact, meta


def install(settings: Settings, served: Served) -> None:
    """Register the artifacts in the settings' registry and put them in their stages."""
    registry = Registry(settings.models_dir)
    for name, stage, entry in (("lstm", "production", served.lstm), ("tft", "shadow", served.tft)):
        if entry is not None:
            version = registry.register(name, *entry)
            registry.promote(name, version, stage)


def bench_settings(folder: str | Path, **overrides: object) -> Settings:
    """A bench's settings: an embedded broker, a fresh data directory, no auth."""
    given = {
        "kafka_bootstrap": None,
        "broker_port": 0,
        "ws_port": 0,
        "retrain": False,
        "auth": False,
        **overrides,
    }
    return load_settings(data_dir=Path(folder), **given)


def quiet(line: str) -> None:
    """What ``forecast up`` announces (its URLs) is not a bench's output."""


@contextlib.contextmanager
def worker_env(settings: Settings) -> Iterator[None]:
    """The environment ``WorkerPool``'s children read: these settings' data directory,
    horizon, app, topics and session timeout."""
    env = {
        "FORECAST_DATA_DIR": str(settings.data_dir),
        "FORECAST_HORIZON": str(settings.horizon),
        "FORECAST_KAFKA_SESSION_TIMEOUT": str(settings.kafka_session_timeout),
        "FORECAST_RETRAIN": "false",
        "FORECAST_AUTH": "false",
        "FORECAST_WORKER_APP": settings.worker_app,
        "FORECAST_TOPIC_PREFIX": settings.topic_prefix,
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def guarded(work: Awaitable[T], part: Failing) -> T:
    """``work``, unless the worker (or pool) ``part`` fails first: then its reason."""
    task = asyncio.ensure_future(work)
    failed = asyncio.ensure_future(part.failed.wait())
    try:
        await asyncio.wait([task, failed], return_when=asyncio.FIRST_COMPLETED)
    finally:
        failed.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ForecastError(f"the worker failed during the bench: {part.failure!r}")
    return task.result()


# -- readings ---------------------------------------------------------------------------


def reading(sensor: int, step: int, prefix: str = "bench") -> dict:
    """Reading number ``step`` of a sensor: a daily cycle on a level of its own."""
    value = sensor % 7 + math.sin(2 * math.pi * step / 24) + 0.3 * math.sin(step / 97 + sensor)
    return {"sensor_id": f"{prefix}.{sensor}", "ts": START + STEP * step, "value": value}


def _record(batch: list[dict], key: str | None = None) -> Record:
    value = orjson.dumps(batch if len(batch) > 1 else batch[0])
    return (key or batch[0]["sensor_id"]).encode(), value, len(batch)


def history(
    sensors: Iterable[int], steps: range, per_record: int, prefix: str = "bench", block: int = 1
):
    """Each sensor's readings ``steps``, ``per_record`` consecutive ones to a record: fills
    windows with few records, and few state snapshots. Keyed by the first sensor of the
    sensor's block of ``block``, as :func:`rounds` keys its records of that many sensors:
    a sensor's history and its later readings share a partition (and so a worker, and
    their order)."""
    for sensor in sensors:
        key = f"{prefix}.{sensor - sensor % block}"
        for first in range(steps.start, steps.stop, per_record):
            last = min(first + per_record, steps.stop)
            yield _record([reading(sensor, step, prefix) for step in range(first, last)], key)


def rounds(sensors: int, steps: range, per_record: int, limit: int, prefix: str = "bench"):
    """Readings ``steps`` of every sensor, step after step, at most ``limit`` of them.
    A record holds a fixed block of ``per_record`` sensors (over several steps when there
    are fewer sensors), keyed by its first: a sensor's readings stay in one partition."""
    block = min(per_record, sensors)
    span = max(1, per_record // block)
    left = limit
    for first in range(steps.start, steps.stop, span):
        for low in range(0, sensors, block):
            span_steps = range(first, min(first + span, steps.stop))
            batch = [
                reading(s, step, prefix)
                for step in span_steps
                for s in range(low, min(low + block, sensors))
            ][:left]
            if not batch:
                return
            left -= len(batch)
            yield _record(batch)


@dataclass
class Produced:
    records: int = 0
    readings: int = 0
    seconds: float = 0.0


async def produce(bootstrap: str, topics: Sequence[str], records: Iterable[Record]) -> Produced:
    """Send every record to each of ``topics``; wait for the broker's acknowledgements."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, acks=1
    )
    await producer.start()
    out, started, pending = Produced(), time.perf_counter(), []
    try:
        for key, value, count in records:
            for topic in topics:
                pending.append(await producer.send(topic, value, key))
            out.records, out.readings = out.records + 1, out.readings + count
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    out.seconds = time.perf_counter() - started
    return out


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


# -- what the worker did ----------------------------------------------------------------


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = await consumer.end_offsets(partitions)
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


class Commits:
    """What a consumer group has committed of a topic (polled: no event tells it)."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.topic = topic
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
        self.partitions: list[TopicPartition] = []

    async def __aenter__(self) -> Commits:
        await self.consumer.start()
        found = self.consumer.partitions_for_topic(self.topic) or ()
        self.partitions = [TopicPartition(self.topic, p) for p in found]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def total(self) -> int:
        return sum([(await self.consumer.committed(tp)) or 0 for tp in self.partitions])

    async def reach(self, records: int, limit_s: float = 1800.0) -> None:
        """Wait until ``records`` records are committed (the worker commits a batch
        once it is published and its state logged)."""
        async with asyncio.timeout(limit_s):
            while True:
                if await self.total() >= records:
                    return
                await asyncio.sleep(0.1)


async def wait_committed(bootstrap: str, group: str, topic: str, records: int) -> None:
    async with Commits(bootstrap, group, topic) as commits:
        await commits.reach(records)


class Tail:
    """Records of a topic from given offsets on, decoded (JSON)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=8 << 20
        )

    async def start(self, since: dict[int, int]) -> None:
        await self.consumer.start()
        partitions = [TopicPartition(self.topic, p) for p in sorted(since)]
        self.consumer.assign(partitions)
        for tp in partitions:
            self.consumer.seek(tp, since[tp.partition])

    async def take(self, wait_ms: int = 200) -> list[dict]:
        batches = await self.consumer.getmany(timeout_ms=wait_ms, max_records=20_000)
        return [orjson.loads(r.value) for batch in batches.values() for r in batch]

    async def stop(self) -> None:
        await self.consumer.stop()


async def served_on_topic(
    bootstrap: str, topic: str, since: dict[int, int], after_ts: float
) -> Counter[str]:
    """Predictions by model on ``topic`` from ``since`` to its end now, for readings at or
    after ``after_ts``."""
    until = await end_offsets(bootstrap, topic)
    left = sum(until[p] - since.get(p, 0) for p in until)
    tail, counts = Tail(bootstrap, topic), Counter()
    await tail.start({p: since.get(p, 0) for p in until})
    try:
        while left > 0:
            messages = await tail.take(1000)
            left -= len(messages)
            counts.update(m["model"] for m in messages if epoch(m["ts"]) >= after_ts)
    finally:
        await tail.stop()
    return counts


def metric_counts(name: str, label: str) -> Counter[str]:
    """This process's counter ``name`` by ``label`` (e.g. predictions by model)."""
    counts: Counter[str] = Counter()
    for family in metrics.REGISTRY.collect():
        if family.name == name:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels[label]] += sample.value
    return counts


@dataclass
class ServedCount:
    """Predictions by model in a timed part, and the baseline's fallbacks by reason."""

    models: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)

    @classmethod
    def now(cls) -> ServedCount:
        return cls(
            metric_counts("forecast_predictions", "model"),
            metric_counts("forecast_fallbacks", "reason"),
        )

    def since(self, before: ServedCount) -> ServedCount:
        return ServedCount(self.models - before.models, self.fallbacks - before.fallbacks)

    def describe(self) -> str:
        models = ", ".join(f"{m} {int(n)}" for m, n in self.models.most_common()) or "none"
        if not self.fallbacks and "baseline" in self.models:
            return f"{models}; fallbacks {int(self.models['baseline'])}"
        reasons = ", ".join(f"{r} {int(n)}" for r, n in self.fallbacks.most_common())
        return f"{models}; fallbacks {int(sum(self.fallbacks.values()))}" + (
            f" ({reasons})" if reasons else ""
        )


def epoch(stamp: str | float) -> float:
    if isinstance(stamp, int | float):
        return float(stamp)
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of a process, MiB (Linux)."""
    with open(f"/proc/{pid}/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

"""Producers of readings: replay a wide CSV, or simulate sensors."""

from __future__ import annotations

import asyncio
import csv
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from forecast.errors import ConfigError
from forecast.parsing import Invalid, parse_time

TIME_COLUMNS = ("date", "time", "ts", "timestamp", "datetime")
Progress = Callable[[int], None]


def read_wide_csv(
    path: Path, prefix: str | None = None, limit: int | None = None, start: int = 0
) -> Iterator[tuple[float, list[dict]]]:
    """Yield (epoch seconds, readings) per data row from row ``start`` (0-based), at most
    ``limit`` rows; every non-time column is sensor ``<prefix>.<column>``."""
    prefix = prefix or path.stem
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise ConfigError(f"{path}: empty CSV")
        lowered = [h.strip().lower() for h in header]
        time_index = next((i for i, h in enumerate(lowered) if h in TIME_COLUMNS), None)
        if time_index is None:
            raise ConfigError(f"{path}: no time column (one of {', '.join(TIME_COLUMNS)})")
        columns = [(i, f"{prefix}.{h.strip()}") for i, h in enumerate(header) if i != time_index]
        for number, row in enumerate(reader, start=2):
            if number - 2 < start:
                continue
            if limit is not None and number - 2 >= start + limit:
                return
            try:
                ts = parse_time(row[time_index])
            except (Invalid, IndexError):
                raise ConfigError(f"{path}:{number}: unreadable time {row[:1]}") from None
            stamp = _iso(ts)
            readings = []
            for i, sensor_id in columns:
                try:
                    value = float(row[i])
                except (ValueError, IndexError):
                    continue  # a missing cell is a missing reading
                readings.append({"sensor_id": sensor_id, "ts": stamp, "value": value})
            yield ts, readings


async def replay_csv(
    producer: AIOKafkaProducer,
    topic: str,
    path: Path,
    *,
    prefix: str | None = None,
    speed: float = 0.0,
    limit: int | None = None,
    start: int = 0,
    batch: bool = False,
    progress: Progress | None = None,
) -> int:
    """Send the rows of a wide CSV; ``speed`` x real time (0 = as fast as possible).

    With ``batch``, each row goes as one record (a JSON array) keyed by the file prefix;
    otherwise one record per reading, keyed by sensor id.
    """
    sent = 0
    first_ts: float | None = None
    started = time.monotonic()
    pending = []
    for ts, readings in read_wide_csv(path, prefix, limit, start):
        if speed > 0:
            first_ts = ts if first_ts is None else first_ts
            delay = (ts - first_ts) / speed - (time.monotonic() - started)
            if delay > 0:
                await asyncio.sleep(delay)
        if batch and readings:
            key = (prefix or path.stem).encode()
            pending.append(await producer.send(topic, orjson.dumps(readings), key=key))
        else:
            for reading in readings:
                pending.append(
                    await producer.send(
                        topic, orjson.dumps(reading), key=reading["sensor_id"].encode()
                    )
                )
        sent += len(readings)
        if len(pending) >= 5000:
            await asyncio.gather(*pending)
            pending.clear()
            if progress:
                progress(sent)
    await asyncio.gather(*pending)
    if progress:
        progress(sent)
    return sent


async def simulate(
    producer: AIOKafkaProducer,
    topic: str,
    *,
    sensors: int,
    rate: float,
    count: int | None = None,
    prefix: str = "sim",
    seed: int = 0,
    progress: Progress | None = None,
) -> int:
    """Noisy daily sines: ``rate`` readings/s over all sensors; ``count`` None = forever."""
    rng = random.Random(seed)
    phases = [rng.uniform(0, 2 * math.pi) for _ in range(sensors)]
    sent = 0
    started = time.monotonic()
    while count is None or sent < count:
        i = sent % sensors
        now = time.time()
        value = 10 + 5 * math.sin(2 * math.pi * now / 86_400 + phases[i]) + rng.gauss(0, 0.5)
        reading = {"sensor_id": f"{prefix}.{i:05d}", "ts": now, "value": round(value, 4)}
        await producer.send(topic, orjson.dumps(reading), key=reading["sensor_id"].encode())
        sent += 1
        ahead = sent / rate - (time.monotonic() - started)
        if ahead > 0.01:
            await asyncio.sleep(ahead)
        if progress and sent % 1000 == 0:
            progress(sent)
    await producer.flush()
    return sent


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))

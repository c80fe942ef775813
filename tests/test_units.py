"""Pure logic: baseline forecaster, batch processing, hub fan-out, query checks, settings."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pyarrow as pa
import pytest

from forecast.errors import ConfigError
from forecast.settings import load_settings
from gateway.auth import Principal
from gateway.hub import Hub, Subscriber
from models.base import NOT_DUE
from models.baseline import SeasonalNaive
from sinks.batches import batch_tables, decode, encode, encode_chunks
from streams.ordering import Admission, OffsetOrder
from streams.pipeline import BatchProcessor, ModelSet, RawRecord
from streams.snapshots import unpack
from streams.state import SensorState
from streams.validate import Limits

# -- baseline -----------------------------------------------------------------------------


def test_seasonal_naive_repeats_the_last_season() -> None:
    model = SeasonalNaive(horizon=5, season=3)
    state = model.init_state()
    assert model.forecast(state) is None
    for value in [1.0, 2.0]:
        model.update(state, value)
    yhat, _, _ = model.forecast(state)
    assert yhat == [2.0] * 5  # not a full season yet: repeat the last value
    model.update(state, 3.0)
    yhat, lower, upper = model.forecast(state)
    assert yhat == [1.0, 2.0, 3.0, 1.0, 2.0]
    assert all(lo <= y <= hi for lo, y, hi in zip(lower, yhat, upper, strict=True))
    # Intervals widen after each full season of the horizon.
    assert upper[3] - yhat[3] > upper[0] - yhat[0]


def test_seasonal_naive_on_a_perfect_season_has_zero_width_after_warm_up() -> None:
    model = SeasonalNaive(horizon=4, season=2, alpha=1.0)
    state = model.init_state()
    for value in [5.0, 7.0] * 10:
        model.update(state, value)
    yhat, lower, upper = model.forecast(state)
    assert yhat == [5.0, 7.0, 5.0, 7.0]
    assert lower == yhat == upper


# -- batch processing ---------------------------------------------------------------------


def processor(states: dict[str, SensorState], lateness: float = 3600.0) -> BatchProcessor:
    models = ModelSet(SeasonalNaive(horizon=3, season=2))
    return BatchProcessor(
        lambda: models,
        Limits(),
        lateness,
        states.get,
        clock=lambda: 1_800_000_000.0,
    )


def record(offset: int, sensor: str, ts: float, value: float = 1.0) -> RawRecord:
    raw = orjson.dumps({"sensor_id": sensor, "ts": ts, "value": value})
    return RawRecord("readings", 0, offset, sensor.encode(), raw)


def test_batch_forecasts_from_the_second_reading_with_increasing_seq() -> None:
    result = processor({}).process([record(i, "s", 1e9 + 60 * i, i) for i in range(4)])
    assert [p.seq for p in result.predictions] == [1, 2, 3]
    assert [p.ts for p in result.predictions] == [1e9 + 60, 1e9 + 120, 1e9 + 180]
    assert {p.step_seconds for p in result.predictions} == {60.0}
    assert len(result.readings) == 4
    assert result.outcomes["accepted"] == 4
    partition, state = result.touched["s"]
    assert (partition, state.seq, state.last_ts) == (0, 3, 1e9 + 180)


def test_late_and_out_of_order_readings() -> None:
    baseline = {"history": [1.0, 1.0], "var": 0.0, "errors": 0}
    recent = [1e9 - 60 * i for i in range(10, -1, -1)]
    state = SensorState(1e9, 60.0, 5, {"baseline@1": baseline}, recent)
    states = {"s": state}
    result = processor(states, lateness=600).process(
        [
            record(0, "s", 1e9),  # duplicate time
            record(1, "s", 1e9 - 300),  # out of order, inside the lateness
            record(2, "s", 1e9 - 601),  # beyond it
            record(3, "s", 1e9 + 60),
        ]
    )
    assert result.outcomes == {"duplicate": 1, "out_of_order": 1, "accepted": 1}
    assert [r.reason for _, r in result.rejected] == ["late"]
    assert [p.seq for p in result.predictions] == [6]
    assert len(result.readings) == 3  # stored for analysts, late one only in the DLQ


def test_records_delivered_again_after_a_crash_are_skipped_not_taken_for_late() -> None:
    states: dict[str, SensorState] = {}
    first = processor(states).process([record(i, "s", 1e9 + 3600 * i) for i in range(5)])
    states["s"] = SensorState.from_bytes(first.touched["s"][1].to_bytes())  # the snapshot
    assert states["s"].source == (0, 4)
    # The offsets were not committed: the batch comes again, followed by new records.
    again = processor(states).process([record(i, "s", 1e9 + 3600 * i) for i in range(7)])
    assert again.outcomes == {"redelivered": 5, "accepted": 2}
    assert not again.rejected
    assert [r.ts for r in again.readings] == [1e9 + 3600 * 5, 1e9 + 3600 * 6]
    assert [p.seq for p in again.predictions] == [5, 6]
    # The same offset in another partition (say, after the partition count grew) is new.
    moved = RawRecord(
        "readings", 1, 2, b"s", orjson.dumps({"sensor_id": "s", "ts": 1e9 + 36000, "value": 1})
    )
    assert processor(states).process([moved]).outcomes == {"accepted": 1}


def feed(batches: list[list[tuple[float, float]]], season: int = 4) -> SensorState:
    """Readings (ts, value) of one sensor in batches; the sensor's state afterwards."""
    states: dict[str, SensorState] = {}
    models = ModelSet(SeasonalNaive(horizon=3, season=season))
    work = BatchProcessor(lambda: models, Limits(), 3600.0, states.get, clock=lambda: 2e9)
    offset = 0
    for batch in batches:
        records = []
        for ts, value in batch:
            records.append(record(offset, "s", ts, value))
            offset += 1
        for sensor, (_, state) in work.process(records).touched.items():
            states[sensor] = state
    return states["s"]


def test_a_late_reading_lands_where_it_belongs_in_the_windows() -> None:
    readings = [(1e9 + 60 * i, float(i * i)) for i in range(8)]
    in_time = feed([readings])
    late = feed([readings[:5] + readings[6:], [readings[5]]])  # the sixth, two readings late
    assert late.models["baseline@1"]["history"] == in_time.models["baseline@1"]["history"]
    assert late.recent == in_time.recent
    again = feed([readings, [(readings[6][0], 99.0)]])  # a corrected re-send replaces
    assert again.models["baseline@1"]["history"] == [16.0, 25.0, 99.0, 49.0]


def test_state_snapshot_round_trips_and_keeps_late_positions() -> None:
    state = feed([[(1e9 + 60 * i, float(i)) for i in range(3)]])
    copy = SensorState.from_bytes(state.to_bytes())
    assert copy.to_bytes() == state.to_bytes()
    assert copy.place(1e9 + 30) == (2, False)
    assert copy.place(1e9 + 120) == (0, True)
    assert copy.place(1e9 - 1) is None


def test_a_batch_travels_to_the_sink_as_arrow_tables() -> None:
    result = processor({}).process([record(0, "s", 1e9), record(1, "s", 1e9 + 3600)])
    tables = batch_tables(result.readings, result.predictions, now=2e9)
    assert set(tables) == {"readings", "predictions"}
    for name, table in tables.items():
        chunks = encode_chunks(table, max_bytes=64)  # a row a record, at this size
        assert len(chunks) == table.num_rows
        assert pa.concat_tables([decode(name, c) for c in chunks]).equals(table)
    (prediction,) = tables["predictions"].to_pylist()
    assert prediction["yhat"] == result.predictions[0].yhat
    assert prediction["ts"].timestamp() == 1e9 + 3600
    with pytest.raises(ValueError, match="schema"):
        decode("readings", encode(tables["predictions"]))
    with pytest.raises(ValueError, match="Arrow"):
        decode("readings", b"not arrow")


@pytest.mark.parametrize("covariates", [None, [{}, {"temp": 1.5, "rain": 0.0}, {}]])
def test_the_columns_make_the_tables_the_rows_make(covariates) -> None:
    from forecast.columns import PredictionBlock, ReadingBlock
    from sinks.batches import block_tables

    rng = np.random.default_rng(3)
    ts, values = 1.7e9 + rng.random(3) * 1e6, rng.normal(size=3)
    readings = ReadingBlock(["a", "b", "c"], ts, values, covariates)
    predictions = PredictionBlock(
        ["a", "b"],
        np.array([1.7e9, 1.7e9 + 0.25]),
        1.7e9 + 1,
        ["lstm", "baseline"],
        np.array([3, 1]),
        np.array([3600.0, 60.0]),
        *(rng.normal(size=(2, 4)) for _ in range(3)),
        np.array([7, 9]),
    )
    got = block_tables(readings, [predictions], now=2e9)
    want = batch_tables(readings.rows(), predictions.rows(), now=2e9)
    assert set(got) == set(want) == {"readings", "predictions"}
    for name, table in want.items():
        assert got[name].equals(table), name


async def test_the_worker_keeps_live_states_only_and_hands_them_back_on_revocation() -> None:
    from streams.worker import Worker

    models = ModelSet(SeasonalNaive(horizon=3, season=2))
    worker = Worker(load_settings(), "127.0.0.1:9", lambda: models)  # not started
    # As restored from the changelog after a restart:
    worker.table.keep_snapshot("s", SensorState(1e9, 60.0, 7).to_bytes())
    result = worker.processor.process([record(0, "s", 1e9 + 60)])  # a batch advances it
    assert result.predictions.seq.tolist() == [8] and "s" not in worker.table.data
    await worker._on_revoked(worker.app, set())
    assert not worker.processor.slots.live_ids
    assert unpack(worker.table.data["s"])["seq"] == 8
    assert worker.processor.process([record(1, "s", 1e9 + 120)]).predictions.seq.tolist() == [9]


async def test_the_newest_of_two_copies_of_a_state_is_kept_on_revocation() -> None:
    """Standby replication brought another worker's newer state of a sensor while this
    worker still held the partition's old one: handing back keeps the newer."""
    from streams.worker import Worker

    models = ModelSet(SeasonalNaive(horizon=3, season=2))
    worker = Worker(load_settings(), "127.0.0.1:9", lambda: models)  # not started
    worker.processor.process([record(0, "s", 1e9)])  # live, seq 0
    worker.table.data["s"] = SensorState(1e9 + 120, 60.0, 9).to_bytes()  # from the changelog
    await worker._on_revoked(worker.app, set())
    assert unpack(worker.table.data["s"])["seq"] == 9


# -- partition order ----------------------------------------------------------------------


def sort(order: OffsetOrder, *offsets: int, partition: str = "p") -> Admission:
    return order.sort([(partition, o) for o in offsets], lambda event: event)


def offsets(events: list[tuple[str, int]]) -> list[int]:
    return [offset for _, offset in events]


def test_a_partition_is_taken_in_offset_order_and_a_hole_is_read_again() -> None:
    now = [0.0]
    order = OffsetOrder(lambda p: None, retry_after=1.0, pass_after=30.0, clock=lambda: now[0])
    first = sort(order, 5, 6, 7)
    assert offsets(first.admitted) == [5, 6, 7] and not first.rewind
    # The consumer skipped 8-10: what follows waits, unacknowledged, and 8 is read again.
    skipped = sort(order, 11, 12, 6)
    assert (offsets(skipped.admitted), offsets(skipped.held)) == ([], [11, 12])
    assert offsets(skipped.repeated) == [6] and skipped.rewind == {"p": 8}
    assert not sort(order, 13).rewind  # asked once per hole
    now[0] = 0.5
    assert order.overdue() == ({}, [])
    now[0] = 1.0
    assert order.overdue() == ({"p": 8}, [])  # still open: read again
    again = sort(order, 8, 9, 10, 11, 12)
    assert offsets(again.admitted) == [8, 9, 10, 11, 12] and not again.held
    now[0] = 60.0
    assert order.overdue() == ({}, [])


def test_a_hole_that_stays_is_passed_after_several_reads() -> None:
    now = [0.0]
    order = OffsetOrder(lambda p: None, retry_after=1.0, pass_after=30.0, clock=lambda: now[0])
    sort(order, 0, 1)
    assert sort(order, 5, 6).rewind == {"p": 2}  # 2-4 were compacted away
    for t in (1.0, 2.0, 3.0):
        now[0] = t
        assert order.overdue() == ({"p": 2}, [])
        assert offsets(sort(order, 5).held) == [5]
    now[0] = 31.0
    assert order.overdue() == ({"p": 5}, [("p", 2, 4)])
    assert offsets(sort(order, 5, 6).admitted) == [5, 6]


def test_a_partition_starts_at_its_committed_offset_and_is_forgotten_when_revoked() -> None:
    order = OffsetOrder({"p": 10, "q": 10}.get)
    assert sort(order, 12).rewind == {"p": 10}  # 10 and 11 were dropped before delivery
    assert offsets(sort(order, 8, 9, 10, partition="q").admitted) == [10]  # re-read from 10
    order.forget(["p"])
    assert offsets(sort(order, 10).admitted) == [10]


# -- hub ----------------------------------------------------------------------------------


def prediction(sensor: str, seq: int) -> tuple[dict, bytes]:
    message = {"type": "prediction", "sensor_id": sensor, "seq": seq}
    return message, orjson.dumps(message)


def drain(subscriber: Subscriber) -> list[int]:
    out = []
    while not subscriber.queue.empty():
        out.append(orjson.loads(subscriber.queue.get_nowait())["seq"])
    return out


async def test_hub_routes_by_pattern_and_scope_and_resumes_without_gap_or_duplicate() -> None:
    hub = Hub(buffer_size=100)
    everyone = Subscriber(Principal("k", "viewer"), 100)
    scoped = Subscriber(Principal("k2", "viewer", ("a.*",)), 100)
    hub.subscribe(everyone, {"*"}, {})
    hub.subscribe(scoped, {"*"}, {})
    for seq in range(1, 6):
        hub.publish_prediction(*prediction("a.x", seq))
        hub.publish_prediction(*prediction("b.x", seq))
    hub.publish_prediction(*prediction("a.x", 5))  # re-delivered: dropped
    assert len(drain(everyone)) == 10
    assert drain(scoped) == [1, 2, 3, 4, 5]

    late = Subscriber(Principal("k3", "viewer"), 100)
    assert hub.subscribe(late, {"a.*"}, {"a.x": 2}) == 3
    hub.publish_prediction(*prediction("a.x", 6))
    assert drain(late) == [3, 4, 5, 6]


async def test_a_full_queue_marks_only_that_subscriber() -> None:
    hub = Hub()
    slow, fast = Subscriber(Principal("s", "viewer"), 2), Subscriber(Principal("f", "viewer"), 10)
    hub.subscribe(slow, {"*"}, {})
    hub.subscribe(fast, {"*"}, {})
    for seq in range(1, 6):
        hub.publish_prediction(*prediction("a", seq))
    assert slow.overflowed.is_set() and not fast.overflowed.is_set()
    assert drain(fast) == [1, 2, 3, 4, 5]
    assert drain(slow) == [1, 2]
    await asyncio.sleep(0)


# -- settings -----------------------------------------------------------------------------


def test_bad_settings_name_the_variable_and_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORECAST_HTTP_PORT", "eighty")
    with pytest.raises(ConfigError, match=r"FORECAST_HTTP_PORT='eighty'"):
        load_settings()


def test_secrets_are_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORECAST_CLICKHOUSE_URL", "ftp://admin:hunter2@db")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "FORECAST_CLICKHOUSE_URL=***" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    monkeypatch.setenv("FORECAST_CLICKHOUSE_URL", "http://admin:hunter2@db:8123/forecast")
    assert "hunter2" not in repr(load_settings())


def test_settings_defaults_and_topics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORECAST_TOPIC_PREFIX", "prod.")
    monkeypatch.setenv("FORECAST_SENSOR_ALLOW", "ETTh1.*, sim.*")
    settings = load_settings()
    assert settings.http_port == 8000 and settings.ws_port == 8765
    assert settings.topic("readings") == "prod.readings"
    assert settings.sensor_patterns == ("ETTh1.*", "sim.*")


class EveryOther:
    """A stand-in model with a cadence of 2 (pure logic of the batch, no maths)."""

    name, version, horizon = "every-other", 1, 3

    def init_state(self) -> dict:
        return {"n": 0}

    def correct(self, state: dict, value: float, newer: int, replace: bool) -> None:
        pass

    def step(self, items):
        out = []
        for state, value, _ in items:
            state["n"] += 1
            out.append(
                ([value] * 3, [value - 1] * 3, [value + 1] * 3) if state["n"] % 2 else NOT_DUE
            )
        return out


def test_a_model_with_a_cadence_publishes_only_when_due() -> None:
    models = ModelSet(SeasonalNaive(horizon=3, season=2), EveryOther())
    work = BatchProcessor(lambda: models, Limits(), 3600.0, {}.get, clock=lambda: 2e9)
    result = work.process([record(i, "s", 1e9 + 60 * i, float(i)) for i in range(7)])
    assert [(p.model, p.ts) for p in result.predictions] == [
        ("every-other", 1e9 + 60 * i) for i in (2, 4, 6)
    ]
    assert [p.seq for p in result.predictions] == [1, 2, 3]
    assert not result.fallbacks


# -- the worker's send chain ----------------------------------------------------------------


class SlowBroker:
    """A send that completes when the test says so, recording what each send carried."""

    def __init__(self) -> None:
        self.sends: list[list] = []
        self.release = asyncio.Event()

    async def send(self, messages: list) -> None:
        self.sends.append(messages)
        await self.release.wait()
        self.release.clear()


async def test_batches_submitted_during_a_send_go_out_together_and_in_order() -> None:
    from streams.worker import SendChain

    broker, done = SlowBroker(), []
    chain = SendChain(broker.send, depth=4)
    await chain.submit([1], lambda: done.append("a"))
    await asyncio.sleep(0)  # the first send is in flight
    await chain.submit([2], lambda: done.append("b"))
    await chain.submit([3, 4], lambda: done.append("c"))
    await chain.submit([5], lambda: done.append("d"), first=True)  # a send of its own
    await chain.submit([6], lambda: done.append("e"))
    assert broker.sends == [[1]] and done == []
    for _ in range(3):
        broker.release.set()
        await asyncio.sleep(0.01)
    await chain.drain()
    assert broker.sends == [[1], [2, 3, 4], [5, 6]]
    assert done == ["a", "b", "c", "d", "e"]


async def test_the_send_chain_waits_when_full_and_raises_what_a_send_raised() -> None:
    from streams.worker import SendChain

    broker = SlowBroker()
    chain = SendChain(broker.send, depth=1)
    await chain.submit([1], lambda: None)
    await asyncio.sleep(0)
    await chain.submit([2], lambda: None)  # waits behind the send in flight
    third = asyncio.create_task(chain.submit([3], lambda: None))
    await asyncio.sleep(0.01)
    assert not third.done()  # the chain is full: the batch waits
    broker.release.set()
    await asyncio.wait_for(third, 1)

    async def failing(messages: list) -> None:
        raise RuntimeError("broker gone")

    chain.send = failing
    broker.release.set()
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError, match="broker gone"):
        await chain.drain()
    with pytest.raises(RuntimeError, match="broker gone"):
        await chain.submit([4], lambda: None)


async def test_a_batch_waiting_for_room_sees_the_failure_of_the_send_in_flight() -> None:
    from streams.worker import SendChain

    fail = asyncio.Event()

    async def send(messages: list) -> None:
        await fail.wait()
        raise RuntimeError("broker gone")

    chain = SendChain(send, depth=1)
    await chain.submit([1], lambda: None)
    await asyncio.sleep(0)  # in flight
    await chain.submit([2], lambda: None)  # the chain is full
    third = asyncio.create_task(chain.submit([3], lambda: None))
    await asyncio.sleep(0.01)
    fail.set()
    with pytest.raises(RuntimeError, match="broker gone"):
        await asyncio.wait_for(third, 1)  # not left waiting for room that never comes


def test_trim_heap_gives_free_pages_back_to_the_system() -> None:
    from forecast import runtime

    if runtime._MALLOC_TRIM is None:
        pytest.skip("the C library is not glibc")

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    buffers = [bytes(4000) for _ in range(40_000)]  # 160 MB on the C heap (not pymalloc's)
    kept = buffers[::64]  # scattered survivors: the heap's top cannot simply shrink
    del buffers
    before = resident()
    runtime.trim_heap()
    assert before - resident() > 100 * 2**20
    assert len(kept) == 625

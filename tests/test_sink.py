"""The ClickHouse sink against real chDB: idempotent batches, outages, analyst paths."""

from __future__ import annotations

import asyncio
import io
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from aiokafka import AIOKafkaProducer

from forecast.errors import QueryError, QueryRejected, StoreError
from forecast.schemas import Prediction, Reading
from forecast.settings import load_settings
from models.baseline import SeasonalNaive
from sinks.clickhouse import Store
from sinks.consumer import Sink
from sinks.export import ExportRequest, export
from sinks.query import QueryLimits, glob_to_like, run_readonly
from streams.broker import EmbeddedBroker, ensure_topics
from streams.pipeline import ModelSet
from streams.worker import Worker

pytestmark = pytest.mark.integration

T0 = 1467331200.0  # 2016-07-01T00:00:00Z
NOW = time.time()  # issued_at is "now": retention counts from it


def count(store: Store, sql: str, final: bool = True) -> int:
    return store.query(sql, settings={"final": int(final)})[0][0]


def batch(sensor: str, n: int) -> tuple[list[Reading], list[Prediction]]:
    readings = [Reading(sensor, T0 + 3600 * i, float(i)) for i in range(n)]
    predictions = [
        Prediction(
            sensor,
            T0 + 3600 * i,
            NOW,
            "baseline",
            1,
            3600.0,
            [1.0, 2.0],
            [0.0, 1.0],
            [2.0, 3.0],
            i + 1,
        )
        for i in range(n)
    ]
    return readings, predictions


def test_the_same_batch_twice_is_stored_once(store: Store) -> None:
    readings, predictions = batch("dedup.a", 50)
    store.write_batch(readings, predictions, token="t1")
    store.write_batch(readings, predictions, token="t1")  # an identical retry: dropped
    where = "WHERE sensor_id = 'dedup.a'"
    assert count(store, f"SELECT count() FROM forecast.readings {where}", final=False) == 50
    assert count(store, f"SELECT count() FROM forecast.prediction_steps {where}", False) == 100
    assert count(store, f"SELECT count() FROM forecast.predictions {where}", final=False) == 50
    # Re-delivered in another batch: the key collapses it for every engine query path.
    store.write_batch(readings[10:20], predictions[10:20], token="t2")
    for final in (True, False):  # the tables analysts read are views that de-duplicate
        assert count(store, f"SELECT count() FROM forecast.readings {where}", final) == 50
        assert count(store, f"SELECT count() FROM forecast.prediction_steps {where}", final) == 100


def test_migrations_are_versioned_and_idempotent(store: Store) -> None:
    assert store.migrate(365) == 8
    versions = [
        row[0]
        for row in store.query("SELECT version FROM forecast.schema_migrations ORDER BY version")
    ]
    assert versions == [1, 2, 3, 4, 5, 6, 7, 8]


def test_analyst_queries_are_read_only_bounded_and_leave_the_sink_writable(store: Store) -> None:
    readings, predictions = batch("ro.a", 30)
    store.write_batch(readings, predictions, token="ro")
    result = run_readonly(
        store, "SELECT number FROM system.numbers LIMIT 100", QueryLimits(max_rows=10)
    )
    assert (len(result.rows), result.truncated) == (10, True)
    with pytest.raises(QueryRejected):
        run_readonly(store, "INSERT INTO forecast.readings SELECT * FROM forecast.readings")
    with pytest.raises(QueryRejected, match="SETTINGS"):
        run_readonly(store, "SELECT 1 SETTINGS max_result_rows = 0")  # no lifting limits
    with pytest.raises(QueryError):
        run_readonly(store, "SELECT nonsense FROM forecast.readings")
    store.write_batch(*batch("ro.b", 3), token="after")  # the session is writable again
    assert count(store, "SELECT count() FROM forecast.readings WHERE sensor_id = 'ro.b'") == 3


def test_views_leaderboard_and_errors(store: Store) -> None:
    readings = [Reading("view.a", T0 + 3600 * i, 10.0 + i) for i in range(5)]
    predictions = [
        Prediction("view.a", T0, NOW, "m", 2, 3600.0, [11.0, 13.0], [10.5, 12.5], [11.5, 13.5], 1)
    ]
    store.write_batch(readings, predictions, token="view")
    errors = store.query(
        "SELECT horizon, actual, error, covered FROM forecast.forecast_errors "
        "WHERE sensor_id = 'view.a' ORDER BY horizon"
    )
    assert errors == [(1, 11.0, 0.0, True), (2, 12.0, -1.0, False)]
    board = store.query(
        "SELECT model, model_version, steps, mae, mse, coverage FROM "
        "forecast.model_leaderboard(start='2016-07-01', stop='2016-07-02') "
        "WHERE model = 'm'"
    )
    assert board == [("m", 2, 2, 0.5, 0.5, 0.5)]


def test_exports_in_three_formats(store: Store) -> None:
    store.write_batch(*batch("export.one", 4), token="export")
    store.write_batch(*batch("exportXone", 4), token="export-x")  # LIKE's _ must not match
    start, stop = datetime(2016, 7, 1, 1, tzinfo=UTC), datetime(2016, 7, 1, 3, tzinfo=UTC)

    def exported(request: ExportRequest) -> bytes:
        return b"".join(export(store, request))

    csv = exported(ExportRequest("predictions", "export.*", start, stop, "csv")).decode()
    lines = csv.splitlines()
    assert lines[0].startswith('"sensor_id","ts","target_ts","horizon"')
    assert len(lines) == 1 + 2 * 2  # two readings in range, two steps each
    assert all('"export.one"' in line for line in lines[1:])
    rows = exported(ExportRequest("predictions", "export.one", None, None, "json"))
    assert [orjson.loads(r)["seq"] for r in rows.splitlines()][::2] == [1, 2, 3, 4]
    table = pq.read_table(
        io.BytesIO(exported(ExportRequest("predictions", "export.one", None, None, "parquet")))
    )
    assert table.num_rows == 8
    assert glob_to_like("a_b*c?%") == "a\\_b%c_\\%"
    store.write_batch(*batch("export.after", 2), token="export-after")  # still writable
    assert (
        count(store, "SELECT count() FROM forecast.readings WHERE sensor_id = 'export.after'") == 2
    )


class FlakyStore(Store):
    """The real store, failing the inserts whose numbers are listed (then working)."""

    def __init__(self, inner: Store, failing: set[int]) -> None:
        super().__init__(inner.client, embedded=inner.embedded)
        self._lock = inner._lock
        self.failing = failing
        self.calls = 0

    def insert_arrow(self, table, data, token=None) -> None:
        self.calls += 1
        if self.calls in self.failing:
            raise StoreError(f"injected failure of insert {self.calls} into {table}")
        super().insert_arrow(table, data, token)


async def test_store_outage_pauses_the_sink_retries_and_stores_everything_once(
    store: Store, tmp_path: Path
) -> None:
    """The worker goes on while the store fails; the sink pauses, retries, catches up."""
    settings = load_settings(
        data_dir=tmp_path, topic_prefix="outage.", batch_max=40, kafka_session_timeout=2.0
    )
    # Inserts 2, 4, 5, 6 fail: some after the batch's readings went in (a partial batch).
    flaky = FlakyStore(store, failing={2, 4, 5, 6})
    sensors, per_sensor = 4, 60
    async with EmbeddedBroker() as broker:
        await ensure_topics(broker.bootstrap, settings)
        models = ModelSet(SeasonalNaive(horizon=3, season=24))
        worker = Worker(settings, broker.bootstrap, lambda: models)
        await worker.start()
        sink = Sink(settings, broker.bootstrap, flaky)
        await sink.start()
        try:
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
            await producer.start()
            for i in range(per_sensor):
                for s in range(sensors):
                    reading = {"sensor_id": f"outage.{s}", "ts": T0 + 3600 * i, "value": i}
                    await producer.send(
                        "outage.readings", orjson.dumps(reading), key=f"outage.{s}".encode()
                    )
            await producer.stop()
            where = "WHERE sensor_id LIKE 'outage.%'"
            readings_sql = f"SELECT count() FROM forecast.readings {where}"
            predictions_sql = f"SELECT count() FROM forecast.prediction_steps {where}"
            expected = {
                readings_sql: sensors * per_sensor,
                predictions_sql: sensors * (per_sensor - 1) * 3,
                f"SELECT count() FROM forecast.predictions_log {where}": sensors * (per_sensor - 1),
            }
            deadline = time.monotonic() + 60
            # Every table, and no retry in progress: a batch's tables go in one by one.
            while not sink.healthy or any(
                count(store, sql, final=False) < n for sql, n in expected.items()
            ):
                assert time.monotonic() < deadline, "the sink did not catch up"
                await asyncio.sleep(0.2)
        finally:
            await sink.stop()
            await worker.stop()
    assert flaky.calls > 6  # it failed four times, and went on
    assert not worker.failed.is_set() and sink.healthy
    # Exactly once, even without FINAL and in the tables beneath the views: retries
    # carried the same insert tokens.
    for table, expected in (
        ("readings_log", sensors * per_sensor),
        ("predictions_log", sensors * (per_sensor - 1)),
        ("prediction_steps", sensors * (per_sensor - 1) * 3),
    ):
        sql = f"SELECT count() FROM forecast.{table} {where}"
        assert count(store, sql, final=False) == expected, table
    seqs = store.query(
        f"SELECT sensor_id, count(), uniqExact(seq), max(seq) FROM "
        f"forecast.prediction_steps {where} AND horizon = 1 GROUP BY sensor_id"
    )
    assert sorted(seqs) == [
        (f"outage.{s}", per_sensor - 1, per_sensor - 1, per_sensor - 1) for s in range(sensors)
    ]


def test_the_kafka_engine_alternative_parses_and_fills_the_sinks_tables(store: Store) -> None:
    """deploy/clickhouse/kafka_engine.sql, statement by statement, through ClickHouse's
    parser; each materialized view writes exactly the columns of its `_log` table."""
    text = (Path(__file__).parents[1] / "deploy" / "clickhouse" / "kafka_engine.sql").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    statements = [s.strip() for s in code.split(";") if s.strip()]
    assert len(statements) == 8
    for statement in statements:
        formatted = store.parse("SELECT formatQuery({sql:String})", {"sql": statement})[0]
        assert formatted.startswith("CREATE")
    for table in ("readings", "predictions", "drift_events"):
        view = next(s for s in statements if f"forecast.{table}_consumer" in s)
        selected = view.split(" AS\nSELECT ", 1)[1].split("\nFROM")[0]
        names = [c.strip().split(" AS ")[-1] for c in top_level_items(selected.replace("\n", " "))]
        columns = [
            row[0]
            for row in store.query(f"DESCRIBE forecast.{table}_log")
            if row[0] != "detected_at"  # filled by its default
        ]
        assert names == columns, table


def top_level_items(text: str) -> list[str]:
    """``a, f(b, c) AS d`` to ``["a", "f(b, c) AS d"]``."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]

"""The ClickHouse store: one client for chDB (embedded) or a server, migrations, inserts.

chDB runs inside the process and locks its data directory, so on the embedded default
the process that opens the store owns it; other processes reach it through that
process's HTTP API (see :mod:`sinks.owner`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import clickhouse_connect
import orjson
import pyarrow as pa
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError

from forecast.errors import QueryError, StoreError
from forecast.schemas import DriftEvent, Prediction, Reading
from forecast.settings import Settings
from sinks.batches import batch_tables
from sinks.schema import DATABASE, LOG_TABLES, migrations

log = logging.getLogger(__name__)

DECISION_COLUMNS = ["at", "action", "model", "model_version", "detail"]
READ_SETTINGS = {"final": 1}
CHUNK_BYTES = 1 << 16


class Store:
    """A thread-safe ClickHouse client with the engine's tables."""

    def __init__(
        self, client: object, *, embedded: bool, dsn: str = "", analyst_dsn: str = ""
    ) -> None:
        self.client = client
        self.embedded = embedded
        self.dsn = dsn
        self.analyst_dsn = analyst_dsn or dsn
        self._lock = threading.Lock()  # chDB sessions are not re-entrant

    @classmethod
    def open(cls, settings: Settings) -> Store:
        """Connect (chDB under ``data_dir/clickhouse`` unless a server URL is set) and migrate."""
        try:
            if settings.clickhouse_url is not None:
                dsn = settings.clickhouse_url.get_secret_value()
                analyst = settings.clickhouse_analyst_url
                client = clickhouse_connect.get_client(dsn=dsn, database="default")
                store = cls(
                    client,
                    embedded=False,
                    dsn=dsn,
                    analyst_dsn="" if analyst is None else analyst.get_secret_value(),
                )
            else:
                path = Path(settings.data_dir, "clickhouse").resolve()
                path.mkdir(parents=True, exist_ok=True)
                dsn = f"chdb://{path}"
                store = cls(clickhouse_connect.get_client(dsn=dsn), embedded=True, dsn=dsn)
        except Exception as exc:  # the driver raises several unrelated types
            raise StoreError(f"cannot open ClickHouse: {exc}") from exc
        store.migrate(settings.retention_days)
        return store

    @contextlib.contextmanager
    def analyst_session(self) -> Iterator[Store]:
        """A client of its own for an analyst query: its settings (``readonly``, the caps,
        the scope filters) never reach the sink's session, and a long export never holds
        the sink's lock. On a server it logs in as ``FORECAST_CLICKHOUSE_ANALYST_URL``'s
        user when that is set (``deploy/clickhouse/analyst.sql``)."""
        options = {} if self.embedded else {"database": "default"}
        try:
            client = clickhouse_connect.get_client(dsn=self.analyst_dsn, **options)
        except Exception as exc:  # the driver raises several unrelated types
            raise StoreError(f"cannot open an analyst session: {exc}") from exc
        session = Store(client, embedded=self.embedded, dsn=self.analyst_dsn)
        try:
            yield session
        finally:
            session.close()

    def close(self) -> None:
        with self._lock:
            self.client.close()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[object]:
        """The client alone: no statement of this store runs in between (a snapshot of
        every table at one moment between inserts, :mod:`sinks.backup`)."""
        with self._lock:
            yield self.client

    # -- schema -------------------------------------------------------------------------

    def migrate(self, retention_days: int) -> int:
        """Apply the migrations not applied yet; return the schema version."""
        self.command(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
        self.command(
            f"""CREATE TABLE IF NOT EXISTS {DATABASE}.schema_migrations (
                version UInt32, description String, applied_at DateTime64(3, 'UTC')
            ) ENGINE = MergeTree ORDER BY version"""
        )
        done = {row[0] for row in self.query(f"SELECT version FROM {DATABASE}.schema_migrations")}
        version = max(done, default=0)
        for version, description, statements in migrations(retention_days):
            if version in done:
                continue
            for statement in statements:
                self.command(statement)
            self.insert(
                "schema_migrations",
                [(version, description, datetime.now(UTC))],
                ["version", "description", "applied_at"],
                column_oriented=False,
            )
            log.info("applied migration %s: %s", version, description)
        return version

    # -- writes -------------------------------------------------------------------------

    def write_batch(
        self,
        readings: Sequence[Reading],
        predictions: Sequence[Prediction],
        token: str,
        drift: Sequence[DriftEvent] = (),
    ) -> None:
        """Store one processed batch directly (as the sink would); ``token`` makes an
        identical retry a no-op."""
        for name, table in batch_tables(readings, predictions, drift).items():
            self.insert_arrow(LOG_TABLES[name], table, token)

    def insert_arrow(self, table: str, data: pa.Table, token: str | None = None) -> None:
        """Insert an Arrow table in one block, its columns as they are; ``token`` dedups."""
        settings = {} if token is None else {"insert_deduplication_token": f"{table}:{token}"}
        with self._lock:
            try:
                self.client.insert_arrow(f"{DATABASE}.{table}", data, settings=settings)
            except ClickHouseError as exc:
                raise StoreError(f"insert into {table} failed: {exc}") from exc

    def watermarks(self, table: str) -> dict[int, tuple[int, int]]:
        """Per source partition of a ``_log`` table: the highest source offset stored, and
        the latest source record time (ms) stored."""
        rows = self.query(
            f"SELECT src_partition, max(src_offset), max(src_timestamp) FROM {DATABASE}.{table} "
            "WHERE src_offset > 0 GROUP BY src_partition",
            settings={"final": 0},
        )
        return {int(partition): (int(offset), int(at)) for partition, offset, at in rows}

    def write_decision(self, action: str, model: str, version: int, detail: dict) -> None:
        """One step of the retraining loop (trigger, training, comparison, promotion)."""
        row = [datetime.now(UTC), action, model, version, orjson.dumps(detail).decode()]
        self.insert("model_decisions", [row], DECISION_COLUMNS, column_oriented=False)

    def insert(
        self,
        table: str,
        data: Sequence[Sequence],
        columns: list[str],
        token: str | None = None,
        *,
        column_oriented: bool = True,
    ) -> None:
        """Insert ``data`` (a list per column, or rows) in one block; ``token`` dedups."""
        settings = {}
        if token is not None:
            settings["insert_deduplication_token"] = f"{table}:{token}"
        with self._lock:
            try:
                self.client.insert(
                    f"{DATABASE}.{table}",
                    data,
                    column_names=columns,
                    settings=settings,
                    column_oriented=column_oriented,
                )
            except ClickHouseError as exc:
                raise StoreError(f"insert into {table} failed: {exc}") from exc

    # -- reads --------------------------------------------------------------------------

    def query(
        self, sql: str, parameters: dict | None = None, settings: dict | None = None
    ) -> list[tuple]:
        """Rows of a query; ``parameters`` bind its ``{name:Type}`` placeholders."""
        return self.query_with_columns(sql, settings, parameters)[1]

    def query_with_columns(
        self, sql: str, settings: dict | None = None, parameters: dict | None = None
    ) -> tuple[list[str], list[tuple]]:
        with self._lock:
            try:
                result = self.client.query(
                    sql, parameters=parameters, settings={**READ_SETTINGS, **(settings or {})}
                )
            except DatabaseError as exc:  # ClickHouse answered, refusing the query
                raise QueryError(str(exc).strip()) from exc
            except ClickHouseError as exc:
                raise StoreError(str(exc).strip()) from exc
        return list(result.column_names), [tuple(row) for row in result.result_rows]

    def parse(self, sql: str, parameters: dict | None = None) -> list[str]:
        """The first column of a parsing query (``EXPLAIN AST``, ``formatQuery``), run with
        no settings, so that what it shows is only what ``sql`` holds."""
        with self._lock:
            try:
                result = self.client.query(sql, parameters=parameters)
            except DatabaseError as exc:
                raise QueryError(str(exc).strip()) from exc
            except ClickHouseError as exc:
                raise StoreError(str(exc).strip()) from exc
        return [row[0] for row in result.result_rows]

    def raw(self, sql: str, parameters: dict, fmt: str, settings: dict) -> bytes:
        """A query's result in one of ClickHouse's own output formats."""
        with self._lock:
            try:
                return self.client.raw_query(sql, parameters=parameters, settings=settings, fmt=fmt)
            except DatabaseError as exc:
                raise QueryError(str(exc).strip()) from exc
            except ClickHouseError as exc:
                raise StoreError(str(exc).strip()) from exc

    def raw_stream(self, sql: str, parameters: dict, fmt: str, settings: dict) -> Iterator[bytes]:
        """A query's result in one of ClickHouse's output formats, chunk by chunk."""
        try:
            with (
                self._lock,
                self.client.raw_stream(
                    sql, parameters=parameters, settings=settings, fmt=fmt
                ) as stream,
            ):
                yield from iter(lambda: stream.read(CHUNK_BYTES), b"")
        except DatabaseError as exc:
            raise QueryError(str(exc).strip()) from exc
        except ClickHouseError as exc:
            raise StoreError(str(exc).strip()) from exc

    def command(self, sql: str) -> None:
        with self._lock:
            try:
                self.client.command(sql)
            except ClickHouseError as exc:
                raise StoreError(str(exc).strip()) from exc

    def ping(self) -> bool:
        try:
            return self.query("SELECT 1") == [(1,)]
        except (StoreError, QueryError):
            return False


def batch_token(parts: Iterable[tuple[str, int, int]]) -> str:
    """A deterministic token for a batch from its (topic, partition, offset) records."""
    digest = hashlib.blake2b(digest_size=16)
    for topic, partition, offset in parts:
        digest.update(f"{topic}/{partition}/{offset};".encode())
    return digest.hexdigest()

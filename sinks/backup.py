"""The store's part of a backup: every table of database ``forecast`` as ClickHouse's
Native format, dumped with a ``SELECT`` and loaded back with an ``INSERT``.

chDB refuses ``BACKUP ... TO File/Disk`` unless its configuration names an allowed path
or disk, which the embedded store is not started with; the same dump also works on a
ClickHouse server (whose own ``BACKUP DATABASE`` the README describes). The dump holds
the store's client for its whole run, so no insert of this process lands between two
tables: the snapshot is the store at one moment between inserts. Views are not dumped:
restoring opens a fresh store, whose migrations create them, then loads the tables.

Through the owner of the embedded store the dump travels as one stream: a JSON line
(:class:`StoreDump`), then each table's bytes in that order (:func:`encode`,
:func:`decode`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from clickhouse_connect.driver.exceptions import ClickHouseError

from forecast.errors import BackupError
from sinks.clickhouse import Store
from sinks.schema import DATABASE

FORMAT = 1
CHUNK = 1 << 20
MAX_HEADER = 1 << 20
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
NOT_DUMPED = ("schema_migrations",)  # the restoring store's migrations write it
RAW = {"final": 0}


@dataclass(frozen=True)
class TableDump:
    name: str
    rows: int
    bytes: int
    columns: list[str]

    @property
    def file(self) -> str:
        return f"{self.name}.native"


@dataclass(frozen=True)
class StoreDump:
    schema_version: int
    tables: list[TableDump] = field(default_factory=list)
    format: int = FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> StoreDump:
        """Checked: table names are plain identifiers, sizes are counts."""
        try:
            if doc["format"] != FORMAT:
                raise BackupError(f"unknown store dump format {doc['format']!r}")
            tables = [
                TableDump(str(t["name"]), int(t["rows"]), int(t["bytes"]), list(t["columns"]))
                for t in doc["tables"]
            ]
            dump = cls(int(doc["schema_version"]), tables)
        except (KeyError, TypeError, ValueError) as exc:
            raise BackupError(f"a malformed store dump description: {exc!r}") from None
        for table in dump.tables:
            names = [table.name, *table.columns]
            if not all(isinstance(n, str) and NAME.match(n) for n in names):
                raise BackupError(f"a store dump names an odd table or column: {names[:3]!r}")
            if table.rows < 0 or table.bytes < 0:
                raise BackupError(f"a store dump gives {table.name} a negative size")
        if len({t.name for t in dump.tables}) != len(dump.tables):
            raise BackupError("a store dump names a table twice")
        return dump


def dump_store(store: Store, folder: Path) -> StoreDump:
    """Write every table of the store to ``folder/<table>.native``, all in one hold of
    the store's client."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = []
    with store.exclusive() as client:
        try:
            version = _schema_version(client)
            for name in _tables(client):
                tables.append(_dump_table(client, name, folder / f"{name}.native"))
        except ClickHouseError as exc:
            raise BackupError(f"cannot dump the store: {str(exc).strip()[:500]}") from exc
    return StoreDump(version, tables)


def _dump_table(client: Any, name: str, path: Path, attempts: int = 3) -> TableDump:
    """One table into ``path``. Its rows are counted before and after: a merge (or, on a
    server, another writer) that changes them in between makes it dump again."""
    columns = _columns(client, name)
    sql = f"SELECT {', '.join(columns)} FROM {DATABASE}.{name}"
    for _ in range(attempts):
        rows = _count(client, name)
        size = 0
        with client.raw_stream(sql, fmt="Native", settings=RAW) as stream, path.open("wb") as out:
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                out.write(chunk)
                size += len(chunk)
        if _count(client, name) == rows:
            return TableDump(name, rows, size, columns)
    raise BackupError(
        f"{DATABASE}.{name} kept changing while it was dumped (other writers?): try again, "
        "or use the server's BACKUP DATABASE"
    )


def load_store(store: Store, folder: Path, dump: StoreDump) -> dict[str, tuple[int, int]]:
    """Load a dump into a freshly migrated store at the dump's schema version (every
    table it names must exist and be empty); the tables that hold fewer rows than the
    dump after, as {table: (rows held, rows dumped)}: rows past the store's retention
    (its TTL) are dropped as they are inserted."""
    short = {}
    with store.exclusive() as client:
        try:
            version = _schema_version(client)
            if version != dump.schema_version:
                raise BackupError(
                    f"the backup is at schema version {dump.schema_version}, this engine's "
                    f"store at {version}: restore it with the engine version that made it"
                )
            present = set(_tables(client))
            for table in dump.tables:
                if table.name not in present:
                    raise BackupError(f"the store has no table {table.name} to restore")
                if _count(client, table.name):
                    raise BackupError(f"table {DATABASE}.{table.name} is not empty")
            for table in dump.tables:
                if table.rows:
                    with (folder / table.file).open("rb") as data:
                        client.raw_insert(
                            f"{DATABASE}.{table.name}",
                            column_names=table.columns,
                            insert_block=data,
                            settings={"insert_deduplicate": 0},
                            fmt="Native",
                        )
                held = _count(client, table.name)
                if held > table.rows:
                    raise BackupError(f"{table.name}: {held} rows after restoring {table.rows}")
                if held < table.rows:
                    short[table.name] = (held, table.rows)
        except ClickHouseError as exc:
            raise BackupError(f"cannot load the store: {str(exc).strip()[:500]}") from exc
    return short


def encode(dump: StoreDump, folder: Path) -> Iterator[bytes]:
    """The dump as one stream: its description as a JSON line, then each table's bytes."""
    yield orjson.dumps(dump.to_json()) + b"\n"
    for table in dump.tables:
        with (folder / table.file).open("rb") as data:
            yield from iter(lambda: data.read(CHUNK), b"")


def decode(chunks: Iterable[bytes], folder: Path) -> StoreDump:
    """Write a stream made by :func:`encode` into ``folder``; a stream cut short, too
    long or naming odd tables is refused."""
    reader = _Reader(iter(chunks))
    line = reader.line(MAX_HEADER)
    try:
        dump = StoreDump.from_json(orjson.loads(line))
    except orjson.JSONDecodeError as exc:
        raise BackupError(f"the store dump does not start with its description: {exc}") from None
    folder.mkdir(parents=True, exist_ok=True)
    for table in dump.tables:
        with (folder / table.file).open("wb") as out:
            left = table.bytes
            while left:
                piece = reader.read(min(left, CHUNK))
                if not piece:
                    raise BackupError(f"the store dump was cut short in table {table.name}")
                out.write(piece)
                left -= len(piece)
    if reader.read(1):
        raise BackupError("the store dump holds more bytes than it describes")
    return dump


class _Reader:
    """Exact reads over an iterator of chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buffer = b""

    def _fill(self) -> bool:
        for chunk in self.chunks:
            if chunk:
                self.buffer += chunk
                return True
        return False

    def line(self, limit: int) -> bytes:
        while b"\n" not in self.buffer:
            if len(self.buffer) > limit or not self._fill():
                raise BackupError("the store dump does not start with its description")
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def read(self, size: int) -> bytes:
        if not self.buffer:
            self._fill()
        piece, self.buffer = self.buffer[:size], self.buffer[size:]
        return piece


def _count(client: Any, table: str) -> int:
    return int(
        client.query(f"SELECT count() FROM {DATABASE}.{table}", settings=RAW).result_rows[0][0]
    )


def _schema_version(client: Any) -> int:
    result = client.query(f"SELECT max(version) FROM {DATABASE}.schema_migrations", settings=RAW)
    return int(result.result_rows[0][0])


def _tables(client: Any) -> list[str]:
    """The tables holding data (not views), by name."""
    result = client.query(
        "SELECT name FROM system.tables WHERE database = {db:String} "
        "AND engine NOT IN ('View', 'MaterializedView', 'LiveView', 'Dictionary') "
        "AND NOT is_temporary ORDER BY name",
        parameters={"db": DATABASE},
    )
    names = [row[0] for row in result.result_rows if row[0] not in NOT_DUMPED]
    odd = [n for n in names if not NAME.match(n)]
    if odd:
        raise BackupError(f"cannot dump tables with these names: {odd}")
    return names


def _columns(client: Any, table: str) -> list[str]:
    """The columns a ``SELECT *`` gives and an ``INSERT`` takes, in order."""
    result = client.query(
        "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String} "
        "AND default_kind NOT IN ('MATERIALIZED', 'ALIAS', 'EPHEMERAL') ORDER BY position",
        parameters={"db": DATABASE, "t": table},
    )
    columns = [row[0] for row in result.result_rows]
    odd = [c for c in columns if not NAME.match(c)]
    if odd:
        raise BackupError(f"cannot dump {table}: columns with these names: {odd}")
    return columns

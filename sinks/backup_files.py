"""A backup folder: its files, ``manifest.json`` and the checks a restore makes first.

Layout::

    manifest.json            format, engine version, created_at, source, the store's
                             schema version and rows per table, every file's size and SHA-256
    clickhouse/<table>.native    each table of database ``forecast`` (:mod:`sinks.backup`)
    models/...               the model registry folder, copied under its lock
    data/<name>.db           every SQLite file of the data directory (``keys.db``, ...),
                             copied with SQLite's backup API (a consistent copy while in use)

The manifest is written last: a folder without one is an unfinished backup. Restoring
reads only the files the manifest names, and only after every one matches its size and
checksum; a name that leaves the folder (absolute, ``..``, a symlink on the way) or
lies outside the three areas is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import orjson

from forecast import __version__
from forecast.errors import BackupError
from sinks.backup import StoreDump

FORMAT = 1
MANIFEST = "manifest.json"
STORE, MODELS, DATA = "clickhouse", "models", "data"
AREAS = (STORE, MODELS, DATA)
SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
REGISTRY_SKIPPED = (".lock",)  # the registry's lock file, not its content
CHUNK = 1 << 20


@dataclass(frozen=True)
class Manifest:
    doc: dict[str, Any]
    store: StoreDump
    files: dict[str, Path]  # name in the manifest -> the verified file

    def under(self, area: str) -> dict[str, Path]:
        """The files of one area, by their path inside it."""
        prefix = f"{area}/"
        return {n[len(prefix) :]: p for n, p in self.files.items() if n.startswith(prefix)}


# -- taking ------------------------------------------------------------------------------


def write_backup(
    directory: Path,
    data_dir: Path,
    dump: Callable[[Path], tuple[StoreDump, dict[str, Any]]],
) -> dict[str, Any]:
    """A backup of ``data_dir`` in ``directory`` (new or empty): the store as ``dump``
    writes it into a folder (it returns the dump and how it was taken), the registry,
    the SQLite files, then the manifest. A failure leaves no half-made folder behind."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise BackupError(f"{directory} is not empty: back up into a new or empty folder")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        store, how = dump(directory / STORE)
        copy_registry(data_dir / MODELS, directory / MODELS)
        for db in sqlite_files(data_dir):
            copy_sqlite(db, directory / DATA / db.name)
        source = {"host": socket.gethostname(), "data_dir": str(data_dir.resolve()), **how}
        return write_manifest(directory, source, store)
    except BaseException:
        empty(directory, created)
        raise


def sqlite_files(data_dir: Path) -> list[Path]:
    """The SQLite databases at the top of the data directory (``*.db``), by name."""
    found = []
    for path in sorted(data_dir.glob("*.db")):
        if path.is_symlink() or not path.is_file():
            continue
        with path.open("rb") as handle:
            if handle.read(len(SQLITE_HEADER)) == SQLITE_HEADER:
                found.append(path)
    return found


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a database in use (SQLite's online backup), mode 0600."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    with (
        contextlib.closing(sqlite3.connect(source, timeout=10.0)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


def copy_registry(root: Path, target: Path) -> int:
    """Copy the registry folder while no writer changes it (its writers lock
    ``.lock``; this takes the same lock shared); the number of files copied."""
    if not root.is_dir():
        return 0
    copied = 0
    with _registry_lock(root):
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            if path.is_symlink() or not path.is_file() or relative.name in REGISTRY_SKIPPED:
                continue
            if path.suffix == ".tmp":  # a stage file being replaced
                continue
            out = target / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
            copied += 1
    return copied


@contextlib.contextmanager
def _registry_lock(root: Path) -> Iterator[None]:
    with (root / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield


def write_manifest(root: Path, source: dict[str, Any], store: StoreDump) -> dict[str, Any]:
    """Describe every file under ``root`` and write ``manifest.json`` (atomically, last)."""
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            size, digest = checksum(path)
            files.append(
                {"path": path.relative_to(root).as_posix(), "size": size, "sha256": digest}
            )
    doc = {
        "format": FORMAT,
        "version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "source": source,
        "schema_version": store.schema_version,
        "rows": {t.name: t.rows for t in store.tables},
        "store": store.to_json(),
        "files": files,
    }
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    os.replace(tmp, root / MANIFEST)
    return doc


def checksum(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# -- checking ----------------------------------------------------------------------------


def read_manifest(root: Path) -> Manifest:
    """The manifest of the backup in ``root``, once every file it names is checked."""
    if not root.is_dir():
        raise BackupError(f"{root} is not a folder")
    path = root / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise BackupError(f"{root} has no {MANIFEST}: not a backup, or an unfinished one")
    try:
        doc = orjson.loads(path.read_bytes())
        if doc["format"] != FORMAT:
            raise BackupError(f"{MANIFEST}: unknown format {doc['format']!r}")
        entries = [(e["path"], int(e["size"]), str(e["sha256"])) for e in doc["files"]]
        store = StoreDump.from_json(doc["store"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BackupError(f"{MANIFEST} is malformed: {exc!r}") from None
    files: dict[str, Path] = {}
    for name, size, digest in entries:
        file = member(root, name)
        if name in files:
            raise BackupError(f"{MANIFEST} names {name!r} twice")
        got_size, got_digest = checksum(file)
        if got_size != size or got_digest != digest:
            raise BackupError(
                f"{name}: checksum mismatch ({got_size} bytes, the manifest says {size}): "
                "the backup was changed or damaged"
            )
        files[name] = file
    for table in store.tables:
        if f"{STORE}/{table.file}" not in files:
            raise BackupError(f"{MANIFEST} lists table {table.name} but not its file")
    return Manifest(doc, store, files)


def member(root: Path, name: object) -> Path:
    """The file ``name`` (a manifest's path) inside ``root``: relative, in an area,
    with no ``..`` and no symlink on the way; refused otherwise."""
    if not isinstance(name, str) or not name or "\\" in name or not name.isprintable():
        raise BackupError(f"{MANIFEST} names an odd path {name!r}")
    parts = name.split("/")
    if PurePosixPath(name).is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise BackupError(f"{MANIFEST} names {name!r}, a path outside the backup")
    if len(parts) < 2 or parts[0] not in AREAS:
        raise BackupError(f"{MANIFEST} names {name!r}, outside {', '.join(AREAS)}")
    if parts[0] == DATA and (len(parts) != 2 or not parts[1].endswith(".db")):
        raise BackupError(f"{MANIFEST} names {name!r}; data/ holds only <name>.db files")
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise BackupError(f"{name!r} in the backup is a symlink")
    if not path.is_file():
        raise BackupError(f"{name!r} is missing from the backup: it is incomplete")
    return path


# -- restoring ---------------------------------------------------------------------------


def restore_files(manifest: Manifest, data_dir: Path) -> None:
    """Copy the registry and the SQLite files of a checked backup into ``data_dir``."""
    for relative, source in manifest.under(MODELS).items():
        _copy_new(source, data_dir / MODELS / relative, 0o644)
    for name, source in manifest.under(DATA).items():
        _copy_new(source, data_dir / name, 0o600)


def _copy_new(source: Path, target: Path, mode: int) -> None:
    """Copy into a new file (never through a file or link already there)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out, source.open("rb") as data:
        shutil.copyfileobj(data, out, CHUNK)


def replaced_parts(data_dir: Path) -> list[Path]:
    """What a forced restore removes from a data directory: the store, the registry,
    the SQLite files (and their side files) and a stale owner file."""
    parts = [data_dir / STORE, data_dir / MODELS, data_dir / "run" / "owner.json"]
    for db in sqlite_files(data_dir):
        parts.append(db)
        parts += [db.with_name(db.name + suffix) for suffix in SQLITE_SIDE_FILES]
    return [p for p in parts if p.exists() or p.is_symlink()]


def empty(directory: Path, created: bool) -> None:
    """Remove what was written into ``directory`` (and the folder, if made here)."""
    if created:
        remove(directory)
        return
    for path in directory.iterdir():
        remove(path)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)

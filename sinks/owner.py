"""Who owns the embedded store: chDB locks its directory to one process, so that process
leaves ``<data_dir>/run/owner.json`` (mode 0600) with its HTTP address and a token, and
other processes (``forecast query``) go through it."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import orjson


@dataclass(frozen=True, slots=True)
class Owner:
    pid: int
    url: str
    token: str


def claim(run_dir: Path, url: str, token: str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "owner.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that already exists
    with os.fdopen(fd, "wb") as handle:
        handle.write(orjson.dumps({"pid": os.getpid(), "url": url, "token": token}))
    return path


def release(run_dir: Path) -> None:
    path = run_dir / "owner.json"
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
        if orjson.loads(path.read_bytes())["pid"] == os.getpid():
            path.unlink()


def find(run_dir: Path) -> Owner | None:
    """The live owner of the embedded store, or None (a stale file is ignored)."""
    try:
        doc = orjson.loads((run_dir / "owner.json").read_bytes())
        owner = Owner(int(doc["pid"]), str(doc["url"]), str(doc["token"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return owner

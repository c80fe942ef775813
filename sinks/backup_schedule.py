"""Scheduled backups, taken by the process that owns the store: every
``FORECAST_BACKUP_INTERVAL`` seconds into ``FORECAST_BACKUP_DIR/backup-<UTC time>``
(a folder as ``forecast backup`` writes it), keeping the newest ``FORECAST_BACKUP_KEEP``.
A failed backup is logged and leaves nothing behind; the next one is tried on time."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

from forecast.errors import ForecastError
from sinks.backup import dump_store
from sinks.backup_files import MANIFEST, remove, write_backup
from sinks.clickhouse import Store

log = logging.getLogger(__name__)

PREFIX = "backup-"


def backup_now(store: Store, data_dir: Path, folder: Path, keep: int) -> Path:
    """One backup into ``folder``, then the older ones beyond ``keep`` removed."""
    target = folder / f"{PREFIX}{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}"
    how = {"store": "chdb" if store.embedded else "server", "through": "schedule"}
    write_backup(target, data_dir, lambda into: (dump_store(store, into), how))
    prune(folder, keep)
    return target


def prune(folder: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` finished backups in ``folder``, and any
    unfinished one (no manifest: its process died while writing it); what went."""
    found = sorted(
        p
        for p in folder.iterdir()
        if p.name.startswith(PREFIX) and p.is_dir() and not p.is_symlink()
    )
    finished = [p for p in found if (p / MANIFEST).is_file()]
    doomed = finished[: max(len(finished) - keep, 0)] + [p for p in found if p not in finished]
    for path in doomed:
        remove(path)
    return doomed


async def run_schedule(
    store: Store, data_dir: Path, folder: Path, interval: float, keep: int
) -> None:
    """Back up every ``interval`` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            path = await asyncio.to_thread(backup_now, store, data_dir, folder, keep)
        except (ForecastError, OSError) as exc:
            log.error("scheduled backup failed: %s", getattr(exc, "message", exc))
        else:
            log.info("scheduled backup written to %s", path)

"""``forecast backup DIR`` and ``forecast restore DIR`` (registered by :mod:`forecast.cli`).

A backup holds the store (through the process that owns the embedded store when one
runs: chDB admits one process), the model registry and every SQLite file of the data
directory; :mod:`sinks.backup_files` describes the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from forecast.cli_common import command, settings_from_env
from forecast.errors import BackupError, ForecastError
from forecast.settings import Settings


@command(None, "backup")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def backup(directory: Path) -> None:
    """Write a snapshot of the store, the model registry and the key store to DIRECTORY
    (new or empty), with manifest.json: sizes, SHA-256 checksums and rows per table."""
    doc = take(settings_from_env(), directory)
    rows = sum(doc["rows"].values())
    through = doc["source"]["through"]
    click.echo(
        f"backed up {rows} rows in {len(doc['rows'])} tables and {len(doc['files'])} files "
        f"to {directory}" + (" (through the running engine)" if through == "owner" else "")
    )


@command(None, "restore")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--force",
    is_flag=True,
    help="Restore into a data directory that is not empty, replacing its store, models "
    "and SQLite files.",
)
def restore(directory: Path, force: bool) -> None:
    """Check a backup's manifest and checksums, then bring FORECAST_DATA_DIR (empty,
    unless --force) back to the backup's state. Refused while a process owns the store."""
    settings = settings_from_env()
    doc = bring_back(settings, directory, force)
    click.echo(
        f"restored {sum(doc['rows'].values())} rows in {len(doc['rows'])} tables and "
        f"{len(doc['files'])} files from the backup of {doc['created_at']} into "
        f"{settings.data_dir}"
    )


def take(settings: Settings, directory: Path) -> dict[str, Any]:
    """Make the backup (the store through its running owner, if one runs)."""
    from sinks.backup_files import write_backup

    return write_backup(directory, settings.data_dir, lambda folder: _dump_store(settings, folder))


def _dump_store(settings: Settings, folder: Path) -> tuple[Any, dict[str, Any]]:
    from sinks import owner
    from sinks.backup import decode, dump_store
    from sinks.clickhouse import Store

    kind = {"store": "server" if settings.clickhouse_url is not None else "chdb"}
    running = owner.find(settings.run_dir) if settings.clickhouse_url is None else None
    if running is None:
        if settings.clickhouse_url is None and not (settings.data_dir / "clickhouse").is_dir():
            raise BackupError(f"{settings.data_dir} holds no store: nothing to back up")
        store = Store.open(settings)
        try:
            return dump_store(store, folder), {**kind, "through": "direct"}
        finally:
            store.close()
    import httpx

    headers = {"Authorization": f"Bearer {running.token}"}
    try:
        with (
            httpx.Client(base_url=running.url, headers=headers, timeout=300.0) as client,
            client.stream("GET", "/v1/backup/store") as response,
        ):
            if response.status_code != 200:
                response.read()
                raise BackupError(_refusal(response, running.url))
            dump = decode(response.iter_bytes(), folder)
    except httpx.HTTPError as exc:
        raise BackupError(f"the running engine at {running.url} did not answer: {exc}") from exc
    return dump, {**kind, "through": "owner", "owner_pid": running.pid}


def _refusal(response: Any, url: str) -> str:
    if response.status_code == 404:
        return (
            f"the running engine at {url} does not serve backups (an older version): "
            "restart it, or stop it and back up then"
        )
    try:
        error = response.json()["error"]
        return f"the running engine refused: {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"the running engine answered HTTP {response.status_code}"


def bring_back(settings: Settings, directory: Path, force: bool) -> dict[str, Any]:
    """Restore a checked backup into the data directory."""
    from sinks import backup_files as files
    from sinks import owner
    from sinks.backup import load_store
    from sinks.clickhouse import Store

    manifest = files.read_manifest(directory)
    data_dir = settings.data_dir
    running = owner.find(settings.run_dir)
    if running is not None:
        raise BackupError(
            f"a running engine (pid {running.pid}, {running.url}) owns {data_dir}: "
            "stop it before restoring"
        )
    present = sorted(p.name for p in data_dir.iterdir()) if data_dir.is_dir() else []
    if present and not force:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise BackupError(
            f"{data_dir} is not empty ({shown}): restore into an empty data directory, "
            "or add --force to replace its store, models and SQLite files"
        )
    doomed = files.replaced_parts(data_dir) if present else []
    inside = [p for p in doomed if directory.resolve().is_relative_to(p.resolve())]
    if inside:
        raise BackupError(f"the backup lies inside {inside[0]}, which restoring replaces")
    for part in doomed:
        files.remove(part)
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        files.restore_files(manifest, data_dir)
        store = Store.open(settings)
        try:
            short = load_store(store, directory / files.STORE, manifest.store)
        finally:
            store.close()
    except BaseException as exc:
        if present:
            if isinstance(exc, ForecastError):
                raise BackupError(f"{exc.message} ({data_dir} is only partly restored)") from exc
            raise
        files.empty(data_dir, created)
        raise
    for table, (held, rows) in short.items():
        click.echo(
            f"warning: {table}: {held} of {rows} rows restored; the others are past the "
            f"store's retention (FORECAST_RETENTION_DAYS={settings.retention_days})",
            err=True,
        )
    return manifest.doc

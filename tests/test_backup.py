"""Backup and restore: the same rows, models and keys after a round trip; tampered,
partial and escaping backups refused; non-empty and owned targets refused."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from forecast.cli_backup import bring_back, take
from forecast.errors import BackupError, ConfigError
from forecast.settings import load_settings
from gateway.auth import Authenticator, KeyStore
from gateway.http import ApiContext, create_app
from models.registry import Registry
from sinks import owner
from sinks.backup import StoreDump, decode, encode
from sinks.backup_files import MANIFEST, checksum, member
from sinks.backup_schedule import backup_now
from sinks.schema import migrations
from tests.conftest import base_env, start_system

# Writes a little of everything into the store of the data directory (in a process of
# its own: chDB opens one data directory per process).
POPULATE = """
import time
from forecast.schemas import DriftEvent, Prediction, Reading
from forecast.settings import load_settings
from sinks.clickhouse import Store

store = Store.open(load_settings())
for batch in range(3):
    readings, predictions = [], []
    for i in range(20):
        ts = 1_700_000_000 + 3600 * (batch * 20 + i)
        for sensor in ("a.x", "a.y"):
            readings.append(Reading(sensor, ts, float(i), {"c": 0.5 * i}))
            predictions.append(
                Prediction(sensor, ts, time.time(), "lstm", 2, 3600.0, [i, i + 1.0],
                           [i - 1.0, i], [i + 1.0, i + 2.0], batch * 20 + i)
            )
    drift = [DriftEvent("a.x", 1_700_000_000 + batch, "adwin", "residual", "lstm", 2, {"n": 1})]
    store.write_batch(readings, predictions, f"batch-{batch}", drift)
store.write_decision("promote", "lstm", 2, {"why": "better"})
store.close()
"""

# Runs `forecast` commands one after the other in one process (each a real CLI run
# through click; one interpreter start instead of several) and prints their outputs.
STEPS = """
import contextlib, io, json, sys
from forecast.cli import main

exec(sys.argv[1])
outputs = []
for args in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main.main(args, prog_name="forecast", standalone_mode=False)
        except SystemExit as exc:  # a command's one-line error
            print(f"exit {exc.code}", file=sys.stderr)
    outputs.append(out.getvalue() or err.getvalue())
print(json.dumps(outputs))
"""

EVERY_ROW = (
    "SELECT t, row FROM ("
    + " UNION ALL ".join(
        f"SELECT '{t}' AS t, toString(tuple(*)) AS row FROM forecast.{t}"
        for t in ("readings", "predictions", "drift_events", "model_decisions")
    )
    + ") ORDER BY t, row"
)
"""Every row of every table, as text, in one query."""


def steps(data_dir: Path, *commands: list[str], before: str = "") -> list[str]:
    """The standard output of each ``forecast`` command, run in one process (or, for
    one that fails, its standard error, ending in ``exit 1``)."""
    result = subprocess.run(
        [sys.executable, "-c", STEPS, before, json.dumps(commands)],
        env=base_env(data_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def register(root: Path) -> None:
    registry = Registry(root)
    for _ in range(2):
        registry.register("lstm", {"kind": "other", "config": {}}, {"metrics": {"test": {}}})


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, booting: Future) -> dict:
    """A data directory with rows in every table, two models, keys and another SQLite
    file; its backup, and every row it held."""
    data_dir = tmp_path_factory.mktemp("source")
    register(data_dir / "models")
    keys = KeyStore(data_dir / "keys.db")
    _, token = keys.create("analyst", "alice", ("a.*",))
    revoked, _ = keys.create("viewer", "bob")
    keys.revoke(revoked)
    with sqlite3.connect(data_dir / "webhooks.db") as db:
        db.execute("CREATE TABLE hooks (url TEXT)")
        db.execute("INSERT INTO hooks VALUES ('https://example.org/h')")
    (data_dir / "notes.db").write_text("not a database")  # left out: not SQLite
    backup = tmp_path_factory.mktemp("backups") / "b1"
    out, rows = steps(
        data_dir,
        ["backup", str(backup)],
        ["query", EVERY_ROW, "--format", "csv"],
        before=POPULATE,
    )
    return {"data_dir": data_dir, "backup": backup, "token": token, "out": out, "rows": rows}


@pytest.fixture(scope="module")
def restored(source: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The backup restored into a fresh data directory, after restores of a tampered
    copy and of one from another schema version failed there (leaving it as it was)."""
    other = tmp_path_factory.mktemp("other") / "b1"
    shutil.copytree(source["backup"], other)
    doc = manifest(other)
    doc["store"]["schema_version"] -= 1
    (other / MANIFEST).write_bytes(orjson.dumps(doc))
    tampered = tmp_path_factory.mktemp("tampered") / "b1"
    shutil.copytree(source["backup"], tampered)
    table = tampered / "clickhouse" / "readings_log.native"
    data = bytearray(table.read_bytes())
    data[-1] ^= 1
    table.write_bytes(bytes(data))
    target = tmp_path_factory.mktemp("restored") / "var"
    checksum_error, error, out, rows = steps(
        target,
        ["restore", str(tampered)],
        ["restore", str(other)],
        ["restore", str(source["backup"])],
        ["query", EVERY_ROW, "--format", "csv"],
    )
    return {
        "data_dir": target,
        "out": out,
        "rows": rows,
        "error": error,
        "checksum_error": checksum_error,
    }


def manifest(backup: Path) -> dict:
    return orjson.loads((backup / MANIFEST).read_bytes())


def test_the_manifest_describes_every_file_and_table(source: dict) -> None:
    doc = manifest(source["backup"])
    tables = len(doc["rows"])  # every table with data, whatever later migrations add
    assert source["out"].startswith(f"backed up 244 rows in {tables} tables")
    assert doc["format"] == 1 and doc["source"]["through"] == "direct"
    assert doc["schema_version"] == len(migrations(365))
    assert {
        "drift_events_log": 3,
        "model_decisions": 1,
        "predictions_log": 120,
        "readings_log": 120,
    }.items() <= doc["rows"].items()
    assert not {"schema_migrations", "readings", "predictions", "forecast_errors"} & set(
        doc["rows"]
    )  # the restoring store's migrations make these
    names = {f["path"] for f in doc["files"]}
    assert {"data/keys.db", "data/webhooks.db", "models/lstm/v2/meta.json"} <= names
    assert "data/notes.db" not in names and "models/.lock" not in names
    for entry in doc["files"]:
        assert checksum(source["backup"] / entry["path"]) == (entry["size"], entry["sha256"])
    mode = (source["backup"] / "data" / "keys.db").stat().st_mode & 0o777
    assert mode == 0o600


def test_a_restore_gives_the_same_rows_models_and_keys(source: dict, restored: dict) -> None:
    assert restored["error"].endswith("exit 1\n")
    version = len(migrations(365))
    assert (
        f"error: the backup is at schema version {version - 1}, this engine's store at "
        f"{version}" in restored["error"]
    )
    assert restored["out"].startswith("restored 244 rows in ")
    assert restored["rows"] == source["rows"]
    assert restored["rows"].count("\npredictions,") == 120
    assert restored["rows"].count("\nmodel_decisions,") == 1
    target = restored["data_dir"]
    assert (
        Registry(target / "models").versions() == Registry(source["data_dir"] / "models").versions()
    )
    keys = KeyStore(target / "keys.db")
    who = keys.authenticate(source["token"])
    assert (who.role, who.scopes) == ("analyst", ("a.*",))
    assert [k.revoked_at is not None for k in keys.list()] == [False, True]
    with sqlite3.connect(target / "webhooks.db") as db:
        assert db.execute("SELECT url FROM hooks").fetchall() == [("https://example.org/h",)]


def copy(backup: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(backup, target)
    return target


def test_a_tampered_file_fails_its_checksum(source: dict, restored: dict, tmp_path: Path) -> None:
    # The command says so in one line, and exits 1.
    line, last = restored["checksum_error"].splitlines()
    assert line.startswith("error: clickhouse/readings_log.native: checksum mismatch (")
    assert line.endswith("the backup was changed or damaged") and last == "exit 1"
    backup = copy(source["backup"], tmp_path)
    with (backup / "models" / "lstm" / "v2" / "meta.json").open("a") as meta:
        meta.write(" ")
    with pytest.raises(BackupError, match=r"models/lstm/v2/meta\.json: checksum mismatch"):
        restore_into(tmp_path / "var", backup)
    assert not (tmp_path / "var").exists()  # nothing was written


def restore_into(data_dir: Path, backup: Path, force: bool = False) -> None:
    """``forecast restore`` in this process, for refusals made before the store opens."""
    bring_back(load_settings(data_dir=data_dir), backup, force)


def test_a_partial_backup_is_refused(source: dict, tmp_path: Path) -> None:
    backup = copy(source["backup"], tmp_path)
    (backup / "models" / "lstm" / "v1" / "meta.json").unlink()
    with pytest.raises(BackupError, match=r"lstm/v1/meta\.json' is missing from the backup"):
        restore_into(tmp_path / "var", backup)
    (backup / MANIFEST).unlink()
    with pytest.raises(BackupError, match=r"no manifest\.json: not a backup, or an unfinished"):
        restore_into(tmp_path / "var", backup)
    assert not (tmp_path / "var").exists()


def test_a_manifest_naming_paths_outside_the_backup_is_refused(
    source: dict, tmp_path: Path
) -> None:
    backup = copy(source["backup"], tmp_path)
    (tmp_path / "outside.db").write_bytes(b"x")
    doc = manifest(backup)
    doc["files"].append({"path": "data/../../outside.db", "size": 1, "sha256": "0"})
    (backup / MANIFEST).write_bytes(orjson.dumps(doc))
    with pytest.raises(BackupError, match=r"names 'data/../../outside.db', a path outside"):
        restore_into(tmp_path / "var", backup)
    assert not (tmp_path / "var").exists()
    for name in ("/etc/passwd", "models/../../x", "./data/keys.db", "other/x", "data/a/b.db", 3):
        with pytest.raises(BackupError):
            member(backup, name)
    (backup / "models" / "link").symlink_to(tmp_path / "outside.db")
    with pytest.raises(BackupError, match="symlink"):
        member(backup, "models/link")
    os.symlink(tmp_path, backup / "models" / "dir")
    with pytest.raises(BackupError, match="symlink"):
        member(backup, "models/dir/outside.db")


def test_a_non_empty_target_is_refused_without_force(source: dict, tmp_path: Path) -> None:
    target = tmp_path / "var"
    target.mkdir()
    (target / "up.log").write_text("kept")
    with pytest.raises(BackupError, match=r"is not empty \(up.log\).*--force"):
        restore_into(target, source["backup"])
    assert [p.name for p in target.iterdir()] == ["up.log"]


def test_a_store_owned_by_a_running_process_is_not_restored_over(
    source: dict, tmp_path: Path
) -> None:
    owner.claim(tmp_path / "var" / "run", "http://127.0.0.1:1", "fp_x")  # this live process
    with pytest.raises(BackupError, match=f"a running engine \\(pid {os.getpid()}, "):
        restore_into(tmp_path / "var", source["backup"], force=True)
    assert (tmp_path / "var" / "run" / "owner.json").exists()
    # A backup goes through that owner, which does not answer here: nothing is left behind.
    with pytest.raises(BackupError, match=r"the running engine at http://127\.0\.0\.1:1 did not"):
        take(load_settings(data_dir=tmp_path / "var"), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_backup_goes_only_into_a_new_or_empty_folder(source: dict, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(BackupError, match="is not empty: back up into a new or empty folder"):
        take(load_settings(data_dir=source["data_dir"]), tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]


def test_a_store_dump_stream_refuses_what_it_does_not_describe(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "t.native").write_bytes(b"abcdef")
    dump = StoreDump.from_json(
        {
            "format": 1,
            "schema_version": 7,
            "tables": [{"name": "t", "rows": 1, "bytes": 6, "columns": ["a"]}],
        }
    )
    stream = b"".join(encode(dump, folder))
    assert decode([stream[:5], stream[5:]], tmp_path / "out") == dump
    assert (tmp_path / "out" / "t.native").read_bytes() == b"abcdef"
    with pytest.raises(BackupError, match="cut short"):
        decode([stream[:-1]], tmp_path / "cut")
    with pytest.raises(BackupError, match="more bytes"):
        decode([stream + b"x"], tmp_path / "long")
    evil = orjson.dumps(
        {
            "format": 1,
            "schema_version": 7,
            "tables": [{"name": "../t", "rows": 0, "bytes": 0, "columns": []}],
        }
    )
    with pytest.raises(BackupError, match="odd table"):
        decode([evil + b"\n"], tmp_path / "evil")
    with pytest.raises(BackupError, match="description"):
        decode([b"x" * 100], tmp_path / "none")


async def test_the_store_endpoint_is_for_admins_and_the_local_cli(store, tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.db")
    auth = Authenticator(keys)
    process = auth.issue_process_token("analyst")
    _, analyst = keys.create("analyst", "a")
    _, admin = keys.create("admin", "b")
    app = create_app(ApiContext(auth=auth, store=store))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        denied = await client.get(
            "/v1/backup/store", headers={"Authorization": f"Bearer {analyst}"}
        )
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
        anonymous = await client.get("/v1/backup/store")
        assert anonymous.status_code == 401
        for token in (process, admin):
            answer = await client.get(
                "/v1/backup/store", headers={"Authorization": f"Bearer {token}"}
            )
            assert answer.status_code == 200
            dump = decode([answer.content], tmp_path / token[:8])
            names = {t.name for t in dump.tables}
            assert {
                "readings_log",
                "predictions_log",
                "drift_events_log",
                "model_decisions",
            } <= names


LATEST = (
    "SELECT sensor_id, max(seq) AS last, argMax(toString(yhat), seq) AS yhat "
    "FROM forecast.predictions GROUP BY sensor_id ORDER BY sensor_id"
)


@pytest.fixture(scope="module")
def booting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Future]:
    """``forecast up --simulate`` (with scheduled backups), started in the background
    when the module starts: it boots while the other tests run."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            start_system,
            tmp_path_factory.mktemp("live"),
            "--simulate",
            "4",
            "--rate",
            "200",
            FORECAST_BACKUP_INTERVAL="1",
        )
        yield future
        future.result().stop()  # stopped already unless a test failed


def test_a_backup_taken_mid_stream_restores_the_latest_forecasts(
    booting: Future, tmp_path: Path
) -> None:
    system = booting.result()
    running = owner.find(system.data_dir / "run")
    assert running is not None
    with httpx.Client(
        base_url=running.url, headers={"Authorization": f"Bearer {running.token}"}
    ) as live:

        def query(sql: str) -> list:
            answer = live.post("/v1/query", json={"sql": sql})
            assert answer.status_code == 200, answer.text
            return answer.json()["rows"]

        deadline = time.monotonic() + 20
        while query("SELECT uniqExact(sensor_id) FROM forecast.predictions")[0][0] < 4:
            assert time.monotonic() < deadline, "not every sensor's prediction was stored"
            time.sleep(0.2)
        backup = tmp_path / "mid"
        doc = take(load_settings(data_dir=system.data_dir), backup)  # through the owner
        issued = {
            (sensor, seq): yhat
            for sensor, seq, yhat in query(
                "SELECT sensor_id, seq, toString(yhat) FROM forecast.predictions"
            )
        }
        scheduled = system.data_dir / "backups"
        while not list(scheduled.glob("backup-*/manifest.json")):
            assert time.monotonic() < deadline + 10, "the owner took no scheduled backup"
            time.sleep(0.2)
    with ThreadPoolExecutor(1) as pool:
        stopped = pool.submit(system.stop)  # while the backup is restored
        assert doc["source"]["through"] == "owner" and doc["rows"]["predictions_log"] > 0
        # Into a directory that is not empty: --force replaces its store, keys, models.
        target = tmp_path / "var"
        KeyStore(target / "keys.db").create("admin", "old")
        (target / "up.log").write_text("kept")
        with pytest.raises(BackupError, match="--force"):
            restore_into(target, backup)
        out, latest = steps(
            target, ["restore", str(backup), "--force"], ["query", LATEST, "--format", "json"]
        )
        assert stopped.result() == 0
    assert out.startswith(f"restored {sum(doc['rows'].values())} rows")
    latest = json.loads(latest)
    assert len(latest) == 4  # every simulated sensor
    for row in latest:  # the running engine issued exactly these
        assert issued[(row["sensor_id"], int(row["last"]))] == row["yhat"]
    assert (target / "up.log").read_text() == "kept"
    assert KeyStore(target / "keys.db").list() == KeyStore(system.data_dir / "keys.db").list()
    taken = sorted(scheduled.glob("backup-*/manifest.json"))
    assert manifest(taken[-1].parent)["source"]["through"] == "schedule"


def test_scheduled_backups_keep_the_newest(store, tmp_path: Path) -> None:
    data_dir, folder = tmp_path / "var", tmp_path / "backups"
    KeyStore(data_dir / "keys.db").create("admin", "ops")
    (folder / "backup-00000000T000000.000000Z").mkdir(parents=True)  # a crash mid-way
    (folder / "other").mkdir()
    taken = [backup_now(store, data_dir, folder, keep=2) for _ in range(3)]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [taken[1].name, taken[2].name, "other"]
    )
    doc = manifest(taken[2])
    assert doc["source"]["through"] == "schedule" and "data/keys.db" in {
        f["path"] for f in doc["files"]
    }
    with pytest.raises(ConfigError, match="FORECAST_BACKUP_KEEP"):
        load_settings(backup_keep=0)

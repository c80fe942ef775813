"""The command line: help everywhere, one-line errors, keys, queries without a server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forecast.cli import main
from tests.conftest import base_env, run_cli


def all_commands() -> list[list[str]]:
    paths = []
    for name, command in main.commands.items():
        paths.append([name])
        paths += [[name, sub] for sub in getattr(command, "commands", {})]
    return paths


@pytest.mark.parametrize("path", all_commands(), ids=" ".join)
def test_every_command_has_help(path: list[str], tmp_path: Path) -> None:
    result = run_cli(*path, "--help", env=base_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ")


def test_a_bad_variable_stops_start_up_with_one_line(tmp_path: Path) -> None:
    result = run_cli("up", env=base_env(tmp_path, FORECAST_WS_PORT="70000"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: invalid configuration: FORECAST_WS_PORT='70000': "
        "Input should be less than or equal to 65535"
    ]


def test_feeding_without_a_broker_says_what_to_do(tmp_path: Path) -> None:
    result = run_cli("simulate", "--count", "1", env=base_env(tmp_path))
    assert result.returncode == 1
    assert "FORECAST_KAFKA_BOOTSTRAP is not set" in result.stderr


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    created = run_cli(
        "keys", "create", "--role", "analyst", "--scope", "ETTh1.*", "--name", "alice", env=env
    )
    assert created.returncode == 0, created.stderr
    key_id = created.stdout.split("key id: ")[1].split()[0]
    token = created.stdout.split("token:  ")[1].split()[0]
    assert token.startswith(f"fk_{key_id}_")
    listed = run_cli("keys", "list", env=env).stdout
    assert key_id in listed and "analyst" in listed and "ETTh1.*" in listed
    assert token.split("_", 2)[2] not in listed and token.split("_", 2)[2] not in (
        tmp_path / "keys.db"
    ).read_bytes().decode(errors="replace")
    revoked = run_cli("keys", "revoke", key_id, env=env)
    assert revoked.returncode == 0, (key_id, revoked.stdout, revoked.stderr)
    again = run_cli("keys", "revoke", key_id, env=env)
    assert again.returncode == 1 and again.stderr.startswith("error: no active key")


def test_query_opens_the_embedded_store_when_nothing_runs(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    result = run_cli(
        "query",
        "SELECT name FROM system.tables WHERE database = 'forecast' ORDER BY name",
        "--format",
        "json",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert [r["name"] for r in json.loads(result.stdout)] == [
        "drift_events",
        "drift_timeline",
        "forecast_errors",
        "model_decisions",
        "model_leaderboard",
        "prediction_steps",
        "predictions",
        "readings",
    ]
    refused = run_cli("query", "DROP TABLE forecast.readings", env=env)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: only SELECT and DESCRIBE queries are allowed")
    outfile = tmp_path / "written"
    refused = run_cli("query", f"SELECT 1 INTO OUTFILE '{outfile}'", env=env)
    assert refused.returncode == 1 and "INTO OUTFILE" in refused.stderr
    assert not outfile.exists()


def test_the_embedded_broker_dies_with_a_killed_parent(tmp_path: Path) -> None:
    """``forecast broker`` killed by SIGKILL (no cleanup runs) takes tansu with it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "forecast", "broker"],
        env=base_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert "kafka: " in process.stdout.readline()
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(children) == 1
        tansu = int(children[0])
        assert "tansu" in Path(f"/proc/{tansu}/cmdline").read_text()
    finally:
        process.kill()
        process.wait(10)
        process.stdout.close()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{tansu}").exists() and "Z" not in _state(tansu):
        assert time.monotonic() < deadline, "tansu outlived its parent"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"

"""The audit log: every change and analyst query through the API and the CLI leaves one
record (who, role, action, target, result, request id), refusals included; no secret is
ever stored; only admins (and the local CLI through the owner) read it.

One real HTTP server on port 0 (in a thread) serves the real chDB store; the CLI runs
in-process against it through the owner file, and once as a subprocess with no owner."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import torch
from click.testing import CliRunner

from forecast.cli import main
from forecast.cli_audit import local_actor
from forecast.metrics import AUDIT_FAILURES
from forecast.settings import load_settings
from gateway.auth import Authenticator, KeyStore
from gateway.http import ApiContext, HttpServer, create_app
from models.lstm import LinearLSTMNet
from models.registry import Registry
from sinks import owner
from sinks.audit import MAX_SQL, AuditEvent, record, scrub
from sinks.clickhouse import Store
from sinks.webhook_targets import Policy
from sinks.webhooks import WebhookStore
from tests.conftest import base_env, run_cli

pytestmark = pytest.mark.integration


@dataclass
class Served:
    url: str
    data_dir: Path
    tokens: dict[str, str]  # role -> API key
    ids: dict[str, str]  # role -> key id
    local: str  # the owner's own token
    store: Store


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, store: Store) -> Iterator:
    data_dir = tmp_path_factory.mktemp("audit")
    settings = load_settings(data_dir=data_dir)
    keys = KeyStore(data_dir / "keys.db")
    made = {role: keys.create(role, role) for role in ("viewer", "analyst", "operator", "admin")}
    registry = Registry(settings.models_dir)
    net = LinearLSTMNet(lookback=8, horizon=4, hidden=2)  # untrained: promotion only loads
    artifact = {
        "kind": "linear-lstm",
        "config": {"lookback": 8, "horizon": 4, "hidden": 2},
        "state_dict": net.state_dict(),
        "quantiles": torch.ones(4),
    }
    for _ in range(2):
        registry.register("lstm", artifact, {"kind": "linear-lstm"})
    auth = Authenticator(keys)
    hooks = WebhookStore(data_dir / "webhooks.db", policy=Policy(allow_private=True))
    ctx = ApiContext(auth=auth, store=store, registry=registry, webhooks=hooks)
    server = HttpServer(create_app(ctx, rate="100000/minute"), "127.0.0.1", 0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(20)
    url = f"http://127.0.0.1:{server.port}"
    local = auth.issue_process_token("analyst")
    owner.claim(settings.run_dir, url, local)
    yield Served(
        url,
        data_dir,
        {role: token for role, (_, token) in made.items()},
        {role: key_id for role, (key_id, _) in made.items()},
        local,
        store,
    )
    owner.release(settings.run_dir)
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(20)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def call(
    served: Served, method: str, path: str, role: str | None = "admin", **kw
) -> tuple[httpx.Response, str]:
    """One request with a request id of our own; (response, request id)."""
    request_id = uuid.uuid4().hex
    headers = {"X-Request-ID": request_id, **kw.pop("headers", {})}
    if role is not None:
        headers["Authorization"] = f"Bearer {served.tokens[role]}"
    response = httpx.request(method, served.url + path, headers=headers, timeout=30, **kw)
    assert response.headers["x-request-id"] == request_id
    return response, request_id


def records(served: Served, rid: str) -> list[dict]:
    rows = served.store.query(
        "SELECT actor, role, action, target, result, request_id, detail "
        "FROM forecast.audit_log WHERE request_id = {id:String}",
        {"id": rid},
    )
    names = ("actor", "role", "action", "target", "result", "request_id", "detail")
    return [{**dict(zip(names, r, strict=True)), "detail": orjson.loads(r[-1])} for r in rows]


def one(served: Served, rid: str, **expected: str) -> dict:
    found = records(served, rid)
    assert len(found) == 1, found
    assert {k: found[0][k] for k in expected} == expected
    return found[0]


def everything(served: Served) -> str:
    rows = served.store.query("SELECT * FROM forecast.audit_log", settings={"final": 0})
    return orjson.dumps(rows, default=str).decode()


def cli(served: Served, *args: str) -> tuple[int, str]:
    """The CLI in this process, with the test server as the store's owner."""
    env = {k: None for k in base_env(served.data_dir)} | {
        "FORECAST_DATA_DIR": str(served.data_dir),
        "FORECAST_LOG_LEVEL": "WARNING",
    }
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


# -- through the API ---------------------------------------------------------------------


def test_key_changes_through_the_api_leave_one_record_each(served: Served) -> None:
    response, rid = call(served, "POST", "/v1/keys", json={"role": "viewer", "name": "k"})
    assert response.status_code == 200
    created = response.json()
    row = one(
        served,
        rid,
        actor=served.ids["admin"],
        role="admin",
        action="keys.create",
        target=created["key_id"],
        result="ok",
        request_id=rid,
    )
    assert row["detail"] == {"role": "viewer", "name": "k", "scopes": ["*"]}

    response, rid = call(served, "DELETE", f"/v1/keys/{created['key_id']}", role="viewer")
    assert response.status_code == 403
    one(served, rid, actor=served.ids["viewer"], role="viewer", action="keys.revoke",
        target=created["key_id"], result="forbidden")  # fmt: skip

    response, rid = call(served, "DELETE", f"/v1/keys/{created['key_id']}")
    assert response.status_code == 200
    one(served, rid, action="keys.revoke", target=created["key_id"], result="ok")
    response, rid = call(served, "DELETE", "/v1/keys/nosuchkey")
    assert response.status_code == 404
    one(served, rid, action="keys.revoke", target="nosuchkey", result="not_found")

    response, rid = call(served, "POST", "/v1/keys", json={"role": "emperor"})
    assert response.status_code == 400
    one(served, rid, action="keys.create", result="bad_request", actor=served.ids["admin"])

    secret = created["token"]
    assert secret.split("_", 2)[2] not in everything(served)


def test_bad_credentials_are_recorded_without_the_credentials(served: Served) -> None:
    forged = "fk_deadbeef_" + "S3cr3t" * 6
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlc2lnbmF0dXJl"
    for token in (forged, jwt):
        response, rid = call(
            served, "POST", "/v1/keys", role=None, json={"role": "admin"},
            headers={"Authorization": f"Bearer {token}"},
        )  # fmt: skip
        assert response.status_code == 401
        one(served, rid, actor="unauthenticated", action="keys.create", result="unauthorized")
    stored = everything(served)
    assert "S3cr3t" not in stored
    assert jwt not in stored
    for token in served.tokens.values():
        assert token.split("_", 2)[2] not in stored
    assert served.local.removeprefix("fp_") not in stored


def test_model_promotion_and_rollback_through_the_api(served: Served) -> None:
    response, rid = call(served, "POST", "/v1/models/lstm/1/promote", role="viewer")
    assert response.status_code == 403
    one(served, rid, role="viewer", action="models.promote", target="lstm v1", result="forbidden")
    for version in (1, 2):
        response, rid = call(served, "POST", f"/v1/models/lstm/{version}/promote", role="operator")
        assert response.status_code == 200, response.text
        row = one(served, rid, actor=served.ids["operator"], role="operator",
                  action="models.promote", target=f"lstm v{version}", result="ok")  # fmt: skip
        assert row["detail"] == {"stage": "production"}
    response, rid = call(served, "POST", "/v1/models/lstm/9/promote", role="operator")
    assert response.status_code == 404
    one(served, rid, action="models.promote", target="lstm v9", result="model_error")
    response, rid = call(served, "POST", "/v1/models/rollback", role="operator")
    assert response.status_code == 200
    row = one(served, rid, action="models.rollback", target="production", result="ok")
    assert row["detail"] == {"name": "lstm", "version": 1}


def test_analyst_queries_and_exports_are_recorded_refusals_with_their_code(
    served: Served,
) -> None:
    response, rid = call(served, "POST", "/v1/query", role="analyst", json={"sql": "SELECT 1"})
    assert response.status_code == 200
    row = one(served, rid, actor=served.ids["analyst"], role="analyst", action="query",
              target="sql", result="ok")  # fmt: skip
    assert row["detail"] == {"sql": "SELECT 1"}
    # the audit log is not among the analysts' tables; nothing can change it from SQL
    for sql in (
        "SELECT * FROM forecast.audit_log",
        "ALTER TABLE forecast.audit_log DELETE WHERE 1",
        "INSERT INTO forecast.audit_log (actor) VALUES ('x')",
    ):
        response, rid = call(served, "POST", "/v1/query", role="analyst", json={"sql": sql})
        assert response.status_code == 400, response.text
        code = response.json()["error"]["code"]
        one(served, rid, action="query", result=code)
        assert code != "ok"
    long_sql = "SELECT 1 -- " + "x" * 5000
    response, rid = call(served, "POST", "/v1/query", role="analyst", json={"sql": long_sql})
    row = one(served, rid, action="query")
    assert len(row["detail"]["sql"]) == MAX_SQL
    assert row["detail"]["sql_chars"] == len(long_sql)
    response, rid = call(served, "POST", "/v1/query", role="viewer", json={"sql": "SELECT 1"})
    assert response.status_code == 403
    one(served, rid, role="viewer", action="query", result="forbidden")

    response, rid = call(served, "GET", "/v1/export", role="analyst", params={"sensors": "a.*"})
    assert response.status_code == 200
    row = one(served, rid, action="export", target="predictions", result="ok")
    assert row["detail"]["sensors"] == "a.*"


def test_only_admins_read_the_audit_log_newest_first_capped(served: Served) -> None:
    for role in ("viewer", "analyst", "operator"):
        response, _ = call(served, "GET", "/v1/audit", role=role)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"
    response, _ = call(served, "GET", "/v1/audit", role=None)
    assert response.status_code == 401
    response, _ = call(served, "GET", "/v1/audit", params={"limit": 1001})
    assert response.status_code == 400
    for _ in range(3):
        call(served, "POST", "/v1/query", role="analyst", json={"sql": "SELECT 2"})
    response, _ = call(served, "GET", "/v1/audit", params={"limit": 2, "action": "query"})
    assert response.status_code == 200
    found = response.json()["records"]
    assert len(found) == 2
    assert found[0]["at"] >= found[1]["at"]
    assert all(r["action"] == "query" for r in found)
    response, _ = call(served, "GET", "/v1/audit", params={"limit": 1000, "action": "keys."})
    assert {r["action"] for r in response.json()["records"]} <= {"keys.create", "keys.revoke"}
    actor = served.ids["operator"]
    response, _ = call(served, "GET", "/v1/audit", params={"actor": actor, "since": "2999-01-01"})
    assert response.json()["records"] == []
    # reading is not itself a change: no record of it
    response, rid = call(served, "GET", "/v1/audit")
    assert records(served, rid) == []
    # the local record route takes only the owner's own token
    body = {"actor": "cli:mallory", "action": "keys.create"}
    response, _ = call(served, "POST", "/v1/audit/local", json=body)
    assert response.status_code == 403


# -- through the CLI ---------------------------------------------------------------------


def test_cli_changes_go_through_the_owner_as_the_local_user(served: Served) -> None:
    me = local_actor()
    status, out = cli(served, "keys", "create", "--role", "analyst", "--name", "cli")
    assert status == 0, out
    key_id = out.split("key id: ")[1].split()[0]
    secret = out.split("token:  ")[1].split()[0].split("_", 2)[2]
    status, out = cli(served, "keys", "revoke", key_id)
    assert status == 0, out
    status, out = cli(served, "keys", "revoke", "nosuchkey")
    assert status == 1
    for version in ("1", "2"):
        status, out = cli(served, "models", "promote", "lstm", version)
        assert status == 0, out
    status, out = cli(served, "models", "rollback")
    assert status == 0, out
    status, out = cli(served, "query", "SELECT 3")
    assert status == 0, out
    status, out = cli(served, "query", "SELECT * FROM forecast.audit_log")
    assert status == 1
    out_file = served.data_dir / "export.csv"
    status, out = cli(served, "export", "--sensors", "none.*", "--output", str(out_file))
    assert status == 0, out
    status, out = cli(served, "audit", "--format", "json", "--actor", me, "--limit", "9")
    assert status == 0, out
    found = orjson.loads(out)
    assert [(r["action"], r["target"], r["result"]) for r in reversed(found)] == [
        ("keys.create", key_id, "ok"),
        ("keys.revoke", key_id, "ok"),
        ("keys.revoke", "nosuchkey", "not_found"),
        ("models.promote", "lstm v1", "ok"),
        ("models.promote", "lstm v2", "ok"),
        ("models.rollback", "production", "ok"),
        ("query", "sql", "ok"),
        ("query", "sql", found[1]["result"]),
        ("export", "predictions", "ok"),
    ]
    assert found[1]["result"] not in ("ok", "")
    assert found[0]["detail"] == {"sensors": "none.*", "format": "csv"}
    assert {(r["actor"], r["role"]) for r in found} == {(me, "local")}
    assert all(len(r["request_id"]) == 32 for r in found)
    assert secret not in everything(served)
    status, out = cli(served, "audit", "--limit", "1")
    assert status == 0 and me in out


def test_cli_without_an_owner_writes_to_the_store_itself(tmp_path: Path) -> None:
    env = base_env(tmp_path / "data")
    result = run_cli("query", "SELECT 4", env=env)
    assert result.returncode == 0, result.stderr
    result = run_cli("audit", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    (row,) = orjson.loads(result.stdout)
    assert (row["actor"], row["role"], row["action"], row["result"]) == (
        local_actor(),
        "local",
        "query",
        "ok",
    )
    assert row["detail"] == {"sql": "SELECT 4"}


# -- when a record cannot be written -----------------------------------------------------


async def test_a_change_stands_when_its_record_cannot_be_written(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.db")
    _, token = keys.create("admin")
    app = create_app(ApiContext(auth=Authenticator(keys)), rate="100000/minute")  # no store
    before = AUDIT_FAILURES._value.get()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post(
            "/v1/keys", json={"role": "viewer"}, headers={"Authorization": f"Bearer {token}"}
        )
    assert response.status_code == 200
    assert response.json()["key_id"] in {k.key_id for k in keys.list()}
    assert AUDIT_FAILURES._value.get() == before + 1


def test_secrets_are_scrubbed_from_what_is_recorded(store: Store) -> None:
    assert scrub("Bearer fk_0a1b2c3d_secretpart and fp_abc") == "Bearer *** and fp_***"
    assert scrub("key fk_0a1b2c3d_secret-part_x") == "key fk_0a1b2c3d_***"
    assert scrub("t=eyJa.eyJb.sig") == "t=<jwt>"
    event = AuditEvent("cli:t", "local", "test.scrub", detail={"sql": "SELECT 'fk_00ff_zzz'"})
    assert record(store, event)
    rows = store.query("SELECT detail FROM forecast.audit_log WHERE action = 'test.scrub'")
    assert rows == [('{"sql":"SELECT \'fk_00ff_***\'"}',)]


def test_webhook_changes_are_recorded_without_their_secrets_or_paths(served: Served) -> None:
    url = "http://127.0.0.1:9/services/T0/B0/hook-path-secret?token=query-secret"
    body = {"url": url, "events": ["drift"], "secret": "s" * 20 + "-signing-secret"}
    response, rid = call(served, "POST", "/v1/webhooks", json=body)
    assert response.status_code == 201, response.text
    hook = response.json()["id"]
    row = one(served, rid, action="webhooks.add", target=hook, result="ok", role="admin")
    assert row["detail"] == {"url": "http://127.0.0.1:9", "events": ["drift"], "sensors": ["*"]}
    response, rid = call(served, "POST", "/v1/webhooks", role="operator", json=body)
    assert response.status_code == 403
    one(served, rid, action="webhooks.add", result="forbidden", role="operator")
    response, rid = call(served, "POST", f"/v1/webhooks/{hook}/resume")
    one(served, rid, action="webhooks.resume", target=hook, result="ok")
    response, rid = call(served, "DELETE", f"/v1/webhooks/{hook}")
    one(served, rid, action="webhooks.remove", target=hook, result="ok")
    response, rid = call(served, "DELETE", f"/v1/webhooks/{hook}")
    one(served, rid, action="webhooks.remove", target=hook, result="not_found")

    status, out = cli(served, "webhooks", "remove", "wh_nosuch")
    assert status == 1
    status, out = cli(served, "audit", "--format", "json", "--action", "webhooks.remove")
    assert status == 0, out
    newest = orjson.loads(out)[0]
    assert (newest["target"], newest["result"], newest["role"]) == (
        "wh_nosuch",
        "not_found",
        "local",
    )
    stored = everything(served)
    for secret in ("hook-path-secret", "query-secret", "signing-secret"):
        assert secret not in stored

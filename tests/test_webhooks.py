"""Webhooks: signed deliveries to a real local receiver, retries, pausing, the durable
queue, SSRF refusals, sensor filters, the admin API and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import orjson
import pytest
from click.testing import CliRunner

from forecast import metrics
from forecast.cli import main
from forecast.errors import WebhookError
from forecast.options import parse_networks
from forecast.settings import load_settings
from gateway.api.context import ApiContext
from gateway.auth import Authenticator, KeyStore
from gateway.http import create_app
from gateway.webhooks import Dispatcher, backoff
from models.registry import Registry
from sinks.webhook_targets import Policy, check_target, verify
from sinks.webhooks import WebhookStore, alert_event, decision_event, drift_event
from streams.alerts import CoverageAlerts, StallAlerts
from streams.liveness import Liveness
from streams.retrain import Retrainer

LOCAL = Policy(allow_private=True)
DRIFT = {
    "type": "drift",
    "sensor_id": "ETTh1.OT",
    "ts": "2016-07-01T00:00:00.000Z",
    "detector": "adwin",
    "signal": "residual",
    "model": "lstm",
    "model_version": 3,
    "detail": {"mean": 1.5},
}


def drift(sensor: str = "ETTh1.OT", **detail: float) -> dict:
    return {**DRIFT, "sensor_id": sensor, "detail": {**DRIFT["detail"], **detail}}


# -- a real local receiver ---------------------------------------------------------------


class Receiver(ThreadingHTTPServer):
    """Records every request; answers the scripted statuses in turn, then 200."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.script: list[int] = []
        self.got = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up
            super().handle_error(request, client_address)

    def reset(self, *statuses: int) -> None:
        self.requests.clear()
        self.script = list(statuses)
        self.got.clear()


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append((self.path, dict(self.headers.items()), body))
        status = self.server.script.pop(0) if self.server.script else 200
        if status == 0:  # too slow: answers after the dispatcher's timeout
            time.sleep(0.5)
            status = 200
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
        self.server.got.set()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def hooks(tmp_path: Path, receiver: Receiver) -> WebhookStore:
    receiver.reset()
    return WebhookStore(tmp_path / "webhooks.db", policy=LOCAL, max_endpoints=3)


def dispatcher(store: WebhookStore, **kw: float) -> Dispatcher:
    options = {"timeout": 2.0, "backoff": 0.01, "backoff_max": 0.02, "poll": 0.02, **kw}
    return Dispatcher(store, **options)  # type: ignore[arg-type]


async def until(condition, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


# The receiver's recipe, as the README gives it.
def verify_signature(secret: str, header: str, body: bytes, tolerance: float = 300) -> bool:
    fields = dict(part.split("=", 1) for part in header.split(","))
    timestamp = int(fields["t"])
    if abs(time.time() - timestamp) > tolerance:
        return False
    signed = f"{timestamp}.".encode() + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


# -- delivery ----------------------------------------------------------------------------


async def test_a_delivery_is_signed_and_verifies(hooks: WebhookStore, receiver: Receiver) -> None:
    endpoint, secret = hooks.create(receiver.url, ["drift"])
    assert secret.startswith("whsec_") and hooks.emit(drift_event(drift())) == 1
    sender = dispatcher(hooks)
    try:
        assert await sender.dispatch() == 1
    finally:
        await sender.stop()
    [(path, headers, body)] = receiver.requests
    [delivery] = hooks.deliveries(endpoint.id)
    assert path == "/hook" and headers["Host"] == receiver.url.split("/")[2]
    assert headers["X-Forecast-Event"] == "drift"
    assert headers["X-Forecast-Delivery"] == delivery.id
    assert verify_signature(secret, headers["X-Forecast-Signature"], body)
    assert verify(secret, headers["X-Forecast-Signature"], body, time.time())
    assert not verify_signature("whsec_another", headers["X-Forecast-Signature"], body)
    assert not verify_signature(secret, headers["X-Forecast-Signature"], body + b" ")
    sent = orjson.loads(body)
    assert sent["type"] == "drift" and sent["data"] == drift() and sent["sensors"] == ["ETTh1.OT"]
    assert (delivery.status, delivery.attempts, delivery.last_status) == ("delivered", 1, 200)
    assert delivery.latency is not None and 0 < delivery.latency < 2


async def test_a_failed_delivery_is_retried(hooks: WebhookStore, receiver: Receiver) -> None:
    endpoint, _ = hooks.create(receiver.url, ["alert"])
    receiver.reset(500)
    hooks.emit(alert_event("worker_stalled", "worker 0 made no progress"))
    sender = dispatcher(hooks)
    await sender.start()
    try:
        await until(lambda: hooks.deliveries(endpoint.id)[0].status == "delivered")
    finally:
        await sender.stop()
    [delivery] = hooks.deliveries(endpoint.id)
    assert delivery.attempts == 2 and len(receiver.requests) == 2
    ids = {headers["X-Forecast-Delivery"] for _, headers, _ in receiver.requests}
    assert ids == {delivery.id}  # the same delivery, signed again
    assert hooks.get(endpoint.id).failures == 0


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    assert [backoff(n, 1.0, 100.0, 0.999999) for n in (1, 2, 3)] == pytest.approx([1, 2, 4])
    assert backoff(3, 1.0, 100.0, 0.0) == 2.0  # half of 4 at the lowest jitter
    assert backoff(40, 1.0, 100.0, 0.999999) == pytest.approx(100.0)


async def test_repeated_failures_pause_the_endpoint_until_resumed(
    hooks: WebhookStore, receiver: Receiver
) -> None:
    endpoint, _ = hooks.create(receiver.url, ["alert"])
    receiver.reset(503, 503, 503, 503)
    hooks.emit(alert_event("worker_stalled", "stalled"))
    paused_before = metrics.REGISTRY.get_sample_value("forecast_webhook_pauses_total") or 0
    sender = dispatcher(hooks, pause_after=3)
    try:
        for _ in range(3):
            await until(lambda: bool(hooks.claim(time.time(), 0.0)))  # due again (no lease)
            assert await sender.dispatch() == 1
        assert (hooks.get(endpoint.id).state, hooks.get(endpoint.id).failures) == ("paused", 3)
        await asyncio.sleep(0.05)
        assert await sender.dispatch() == 0  # a paused endpoint gets nothing
        assert len(receiver.requests) == 3
        paused_now = metrics.REGISTRY.get_sample_value("forecast_webhook_pauses_total")
        assert paused_now == paused_before + 1
        listed = CliRunner().invoke(main, ["webhooks", "list"], env=cli_env(hooks))
        assert "PAUSED since" in listed.output and "failures=3" in listed.output

        receiver.reset()
        assert hooks.resume(endpoint.id).state == "active"
        assert await sender.dispatch() == 1
    finally:
        await sender.stop()
    [delivery] = hooks.deliveries(endpoint.id)
    assert (delivery.status, delivery.attempts) == ("delivered", 4)


async def test_a_delivery_is_given_up_after_its_attempts(
    hooks: WebhookStore, receiver: Receiver
) -> None:
    endpoint, _ = hooks.create(receiver.url, ["alert"])
    receiver.reset(500, 500, 500)
    hooks.emit(alert_event("worker_stalled", "stalled"))
    sender = dispatcher(hooks, max_attempts=2, pause_after=100)
    await sender.start()
    try:
        await until(lambda: hooks.deliveries(endpoint.id)[0].status == "failed")
    finally:
        await sender.stop()
    [delivery] = hooks.deliveries(endpoint.id)
    assert (delivery.attempts, delivery.last_status) == (2, 500)
    assert delivery.last_error == "HTTP 500: ok" and len(receiver.requests) == 2


async def test_redirects_are_not_followed(hooks: WebhookStore, receiver: Receiver) -> None:
    endpoint, _ = hooks.create(receiver.url, ["alert"])
    receiver.reset(302)
    hooks.emit(alert_event("worker_stalled", "stalled"))
    sender = dispatcher(hooks)
    try:
        await sender.dispatch()
    finally:
        await sender.stop()
    [delivery] = hooks.deliveries(endpoint.id)
    assert (delivery.status, delivery.last_status) == ("pending", 302)
    assert [path for path, _, _ in receiver.requests] == ["/hook"]


async def test_a_slow_receiver_times_out(hooks: WebhookStore, receiver: Receiver) -> None:
    endpoint, _ = hooks.create(receiver.url, ["alert"])
    receiver.reset(0)
    hooks.emit(alert_event("worker_stalled", "stalled"))
    sender = dispatcher(hooks, timeout=0.1)
    try:
        started = time.monotonic()
        await sender.dispatch()
        assert time.monotonic() - started < 0.4
    finally:
        await sender.stop()
    [delivery] = hooks.deliveries(endpoint.id)
    assert delivery.status == "pending" and delivery.last_status is None
    assert "Timeout" in (delivery.last_error or "") or "no answer" in (delivery.last_error or "")


async def test_the_queue_survives_a_dispatcher_restart(
    hooks: WebhookStore, receiver: Receiver
) -> None:
    endpoint, _ = hooks.create(receiver.url, ["drift"])
    receiver.reset(500)
    hooks.emit(drift_event(drift()))
    first = dispatcher(hooks, backoff=0.05, backoff_max=0.05)
    try:
        await first.dispatch()  # fails; the retry is queued
    finally:
        await first.stop()
    hooks.emit(drift_event(drift("ETTh1.HUFL")))
    assert hooks.claim(time.time(), lease=0.05)  # claimed by a dispatcher that then dies
    reopened = WebhookStore(hooks.path, policy=LOCAL)  # a new process, the same file
    second = dispatcher(reopened)
    await second.start()
    try:
        await until(lambda: all(d.status == "delivered" for d in reopened.deliveries(endpoint.id)))
    finally:
        await second.stop()
    sensors = [orjson.loads(body)["sensors"][0] for _, _, body in receiver.requests]
    assert sorted(sensors) == ["ETTh1.HUFL", "ETTh1.OT", "ETTh1.OT"]


# -- the targets -------------------------------------------------------------------------

REFUSED = [
    "127.0.0.1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "ff02::1",
    "::ffff:127.0.0.1",
]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_targets_are_refused_by_default(address: str) -> None:
    with pytest.raises(WebhookError) as refused:
        check_target("https://hooks.example.com/x", Policy(), lambda host, port: [address])
    assert refused.value.code == "target_refused"


def test_one_private_address_among_public_ones_is_refused() -> None:
    with pytest.raises(WebhookError, match=r"10\.0\.0\.7"):
        check_target("https://a.example/", Policy(), lambda h, p: ["93.184.216.34", "10.0.0.7"])


def test_allowing_private_targets_by_setting_or_network() -> None:
    public = check_target("https://a.example:8443/x?y=1", Policy(), lambda h, p: ["93.184.216.34"])
    assert public.pinned() == (
        "https://93.184.216.34:8443/x?y=1",
        {"Host": "a.example:8443"},
        {"sni_hostname": "a.example"},
    )
    assert check_target("http://localhost/", LOCAL, lambda h, p: ["127.0.0.1"]).address
    allow = Policy(allow_networks=parse_networks("10.20.0.0/16"))
    assert check_target("http://n.internal/", allow, lambda h, p: ["10.20.3.4"]).address
    with pytest.raises(WebhookError):
        check_target("http://n.internal/", allow, lambda h, p: ["10.21.3.4"])
    for never in ("224.0.0.1", "0.0.0.0", "240.0.0.1"):
        with pytest.raises(WebhookError):
            check_target("http://x/", LOCAL, lambda h, p, a=never: [a])
    settings = load_settings(webhook_allow_private=True, data_dir=Path("/tmp/none"))
    assert settings.webhook_allow_private


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("https://user:pw@example.com/", "credentials"),
        ("https://token@example.com/", "credentials"),
        ("https:///path", "no host"),
        ("https://example.com/#x", "fragment"),
        ("https://example.com/a b", "spaces"),
        ("https://example.com:99999/", "bad webhook URL"),
        ("https://example.com/" + "a" * 2100, "characters"),
    ],
)
def test_bad_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(WebhookError, match=why) as refused:
        check_target(url, LOCAL, lambda h, p: ["93.184.216.34"])
    assert refused.value.code == "bad_url"


async def test_the_target_is_checked_again_at_delivery(tmp_path: Path, receiver: Receiver) -> None:
    answers = {"127.0.0.1": ["127.0.0.1"]}
    policy = Policy(allow_networks=parse_networks("127.0.0.1/32"))
    hooks = WebhookStore(
        tmp_path / "webhooks.db", policy=policy, resolver=lambda host, port: answers[host]
    )
    receiver.reset()
    endpoint, _ = hooks.create(receiver.url, ["alert"])
    answers["127.0.0.1"] = ["10.9.8.7"]  # DNS now answers another address
    hooks.emit(alert_event("worker_stalled", "stalled"))
    sender = dispatcher(hooks)
    try:
        await sender.dispatch()
    finally:
        await sender.stop()
    [delivery] = hooks.deliveries(endpoint.id)
    assert delivery.status == "pending" and "10.9.8.7" in (delivery.last_error or "")
    assert receiver.requests == []


# -- what is queued ----------------------------------------------------------------------


def test_sensor_patterns_and_event_kinds_filter(hooks: WebhookStore, receiver: Receiver) -> None:
    etth1, _ = hooks.create(receiver.url, ["drift", "decision"], ["ETTh1.*"])
    everything, _ = hooks.create(receiver.url, ["drift", "decision", "alert"])
    assert hooks.emit(drift_event(drift("ETTh2.OT"))) == 1  # everything only
    assert hooks.emit(drift_event(drift("ETTh1.OT"))) == 2
    assert hooks.emit(drift_event(drift("ETTh1.OT"))) == 0  # the same event: queued once
    assert hooks.emit(decision_event("triggered", "lstm", 3, {"sensors": ["ETTh1.OT"]})) == 2
    assert hooks.emit(decision_event("triggered", "lstm", 3, {"sensors": ["ETTh2.OT"]})) == 1
    assert hooks.emit(decision_event("kept", "lstm", 3, {"pairs": 500})) == 2  # no sensor
    assert hooks.emit(alert_event("worker_stalled", "stalled")) == 1
    assert (hooks.get(etth1.id).pending, hooks.get(everything.id).pending) == (3, 6)


def test_endpoint_limits(hooks: WebhookStore, receiver: Receiver) -> None:
    for _ in range(3):
        hooks.create(receiver.url, ["alert"])
    with pytest.raises(WebhookError, match="at most 3") as full:
        hooks.create(receiver.url, ["alert"])
    assert full.value.code == "too_many"
    with pytest.raises(WebhookError, match="unknown: bogus"):
        hooks.create(receiver.url, ["bogus"])
    with pytest.raises(WebhookError, match="signing secret"):
        hooks.create(receiver.url, ["alert"], secret="short")
    assert hooks.emit(alert_event("x", "y" * (70 << 10))) == 0  # over the body cap
    assert hooks.path.stat().st_mode & 0o777 == 0o600


async def test_stall_alerts_follow_the_workers_liveness(hooks: WebhookStore) -> None:
    now = [0.0]
    queued = []

    class Worker:
        liveness = Liveness(1.0, 100.0, clock=lambda: now[0])
        failed = asyncio.Event()
        failure: BaseException | None = None

    worker = Worker()
    watch = asyncio.create_task(StallAlerts(worker, queued.append, "w1", interval=0.01).run())
    now[0] = 5.0  # no progress for 5 s
    await until(lambda: len(queued) == 1)
    worker.liveness.took_in({})
    await until(lambda: len(queued) == 2)
    worker.failure = RuntimeError("boom")
    worker.failed.set()
    await asyncio.wait_for(watch, 2.0)
    assert [e.data["alert"] for e in queued] == [
        "worker_stalled",
        "worker_recovered",
        "worker_failed",
    ]
    assert "no progress for 5s" in queued[0].data["message"] and queued[0].kind == "alert"


def test_coverage_alerts_fire_once_per_collapse_and_once_per_recovery(
    hooks: WebhookStore, receiver: Receiver
) -> None:
    etth1, _ = hooks.create(receiver.url, ["alert"], ["ETTh1.*"])
    alerts = CoverageAlerts(hooks.emit, "w1", floor=0.5, margin=0.2, min_scored=50)

    def row(sensor: str, coverage: float, scored: int) -> tuple:
        return (sensor, "lstm", "1", 0.3, coverage, scored)

    assert alerts.observe([row("ETTh1.OT", 0.2, 10)]) == []  # too few residuals yet
    first = alerts.observe([row("ETTh1.OT", 0.3, 60), row("ETTh2.OT", 0.9, 60)])
    assert [e.data["alert"] for e in first] == ["coverage_collapsed"]
    assert first[0].sensors == ("ETTh1.OT",) and first[0].data["detail"]["coverage"] == 0.3
    assert alerts.observe([row("ETTh1.OT", 0.1, 70)]) == []  # still collapsed: no repeat
    assert alerts.observe([row("ETTh1.OT", 0.6, 80)]) == []  # not back far enough yet
    back = alerts.observe([row("ETTh1.OT", 0.75, 90)])
    assert [e.data["alert"] for e in back] == ["coverage_recovered"]
    assert alerts.observe([row("ETTh2.OT", 0.1, 90)])[0].sensors == ("ETTh2.OT",)
    assert hooks.get(etth1.id).pending == 2  # ETTh1's collapse and recovery only


def test_retraining_decisions_are_queued(hooks: WebhookStore, receiver: Receiver) -> None:
    class Decisions:  # the store's part the retrainer writes to
        def write_decision(self, *decision: object) -> None:
            pass

    endpoint, _ = hooks.create(receiver.url, ["decision"])
    retrainer = Retrainer(load_settings(), Decisions(), Registry(hooks.path.parent))  # type: ignore[arg-type]
    retrainer.on_decision = lambda *decision: hooks.emit(decision_event(*decision))
    retrainer._decide("promoted", "lstm", 4, {"pairs": 500})
    [delivery] = hooks.deliveries(endpoint.id)
    assert orjson.loads(delivery.body)["data"]["action"] == "promoted"


# -- the admin API and the CLI -------------------------------------------------------------


@pytest.fixture
async def api(hooks: WebhookStore, tmp_path: Path):
    keys = KeyStore(tmp_path / "keys.db")
    ctx = ApiContext(auth=Authenticator(keys), webhooks=hooks)
    app = create_app(ctx, rate="1000/minute")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        tokens = {role: keys.create(role)[1] for role in ("viewer", "operator", "admin")}
        yield client, tokens, ctx


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_the_api_is_for_admins_only(api, receiver: Receiver) -> None:
    client, tokens, _ = api
    calls = [
        ("GET", "/v1/webhooks"),
        ("POST", "/v1/webhooks"),
        ("DELETE", "/v1/webhooks/wh_1"),
        ("POST", "/v1/webhooks/wh_1/resume"),
        ("GET", "/v1/webhooks/wh_1/deliveries"),
    ]
    for method, path in calls:
        answer = await client.request(method, path, json={"url": receiver.url, "events": ["alert"]})
        assert answer.status_code == 401, path
        for role in ("viewer", "operator"):
            answer = await client.request(
                method, path, headers=bearer(tokens[role]), json={"url": receiver.url}
            )
            assert (answer.status_code, answer.json()["error"]["code"]) == (403, "forbidden")


async def test_the_api_creates_lists_resumes_and_removes(api, receiver: Receiver) -> None:
    client, tokens, ctx = api
    admin = bearer(tokens["admin"])
    made = await client.post(
        "/v1/webhooks",
        headers=admin,
        json={"url": receiver.url, "events": ["drift"], "sensors": ["ETTh1.*"]},
    )
    assert made.status_code == 201, made.text
    created = made.json()
    assert created["secret"].startswith("whsec_") and created["state"] == "active"
    listed = (await client.get("/v1/webhooks", headers=admin)).json()["webhooks"]
    assert [w["id"] for w in listed] == [created["id"]]
    assert created["secret"] not in json.dumps(listed) and "secret" not in listed[0]

    ctx.webhooks.emit(drift_event(drift()))
    found = await client.get(f"/v1/webhooks/{created['id']}/deliveries", headers=admin)
    [delivery] = found.json()["deliveries"]
    assert (delivery["status"], delivery["event"], delivery["attempts"]) == ("pending", "drift", 0)
    resumed = await client.post(f"/v1/webhooks/{created['id']}/resume", headers=admin)
    assert resumed.json()["state"] == "active"
    gone = await client.delete(f"/v1/webhooks/{created['id']}", headers=admin)
    assert gone.json() == {"id": created["id"], "removed": True}
    again = await client.delete(f"/v1/webhooks/{created['id']}", headers=admin)
    assert (again.status_code, again.json()["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"url": "ftp://example.com/", "events": ["drift"]}, 400, "bad_url"),
        ({"url": "http://user:pw@example.com/", "events": ["drift"]}, 400, "bad_url"),
        ({"url": "http://example.com/", "events": ["nope"]}, 400, "bad_request"),
        ({"url": "http://example.com/", "events": []}, 400, "bad_request"),
        ({"url": "http://example.com/", "events": ["drift"], "extra": 1}, 400, "bad_request"),
        ({"url": "http://example.com/", "events": ["drift"], "secret": "x"}, 400, "bad_request"),
        ({"url": "http://127.0.0.1:9/", "events": ["drift"]}, 400, "target_refused"),
        ({"url": "http://169.254.169.254/latest/meta-data", "events": ["alert"]}, 400, None),
    ],
)
async def test_the_api_refuses_bad_webhooks(api, body: dict, status: int, code: str | None) -> None:
    client, tokens, ctx = api
    ctx.webhooks = WebhookStore(ctx.webhooks.path)  # the default policy: public targets only
    answer = await client.post("/v1/webhooks", headers=bearer(tokens["admin"]), json=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == (code or "target_refused")
    assert ctx.webhooks.list() == []


def cli_env(hooks: WebhookStore, **extra: str) -> dict[str, str]:
    return {
        "FORECAST_DATA_DIR": str(hooks.path.parent),
        "FORECAST_WEBHOOK_ALLOW_PRIVATE": "1",
        "FORECAST_LOG_LEVEL": "WARNING",
        **extra,
    }


def test_the_cli_adds_lists_resumes_and_removes(hooks: WebhookStore, receiver: Receiver) -> None:
    cli = CliRunner()
    env = cli_env(hooks, HOOK_SECRET="a-secret-of-enough-length")
    added = cli.invoke(
        main,
        [
            *("webhooks", "add", receiver.url, "--events", "drift,alert"),
            *("--sensors", "ETTh1.*", "--secret-from-env", "HOOK_SECRET"),
        ],
        env=env,
    )
    assert added.exit_code == 0, added.output
    assert "a-secret-of-enough-length" not in added.output and "from $HOOK_SECRET" in added.output
    webhook_id = added.output.split("webhook id: ")[1].split()[0]  # after any warning
    listed = cli.invoke(main, ["webhooks", "list"], env=env)
    assert webhook_id in listed.output and "active" in listed.output
    assert "a-secret" not in listed.output
    assert cli.invoke(main, ["webhooks", "resume", webhook_id], env=env).exit_code == 0
    assert cli.invoke(main, ["webhooks", "deliveries", webhook_id], env=env).exit_code == 0
    assert cli.invoke(main, ["webhooks", "remove", webhook_id], env=env).exit_code == 0
    missing = cli.invoke(main, ["webhooks", "remove", webhook_id], env=env)
    assert missing.exit_code == 1
    assert missing.output.splitlines()[-1] == f"error: no webhook {webhook_id!r}"
    refused = cli.invoke(
        main,
        ["webhooks", "add", "http://127.0.0.1/"],
        env={**env, "FORECAST_WEBHOOK_ALLOW_PRIVATE": "0"},
    )
    assert refused.exit_code == 1 and "not a public address" in refused.output
    generated = cli.invoke(main, ["webhooks", "add", receiver.url], env=env)
    assert "secret:     whsec_" in generated.output


# -- drift events from the broker, through the gateway's wiring ------------------------------


@pytest.mark.integration
async def test_drift_events_on_the_topic_are_delivered(
    broker: str, tmp_path: Path, receiver: Receiver
) -> None:
    from aiokafka import AIOKafkaProducer

    from forecast.runtime import start_webhooks
    from streams.broker import ensure_topics

    settings = load_settings(
        data_dir=tmp_path,
        topic_prefix=f"wh{time.time_ns()}.",
        kafka_partitions=1,
        webhook_allow_private=True,
    )
    await ensure_topics(broker, settings)
    receiver.reset()
    ctx = ApiContext(auth=Authenticator(KeyStore(tmp_path / "keys.db")))
    async with contextlib.AsyncExitStack() as stack:
        await start_webhooks(stack, settings, broker, ctx)
        assert ctx.webhooks is not None
        _, secret = ctx.webhooks.create(receiver.url, ["drift"], ["ETTh1.*"])
        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await producer.start()
        try:
            for sensor in ("ETTh2.OT", "ETTh1.OT"):
                await producer.send_and_wait(
                    settings.topic("drift-events"), orjson.dumps(drift(sensor)), sensor.encode()
                )
        finally:
            await producer.stop()
        await asyncio.to_thread(receiver.got.wait, 10.0)
        await asyncio.sleep(0.2)  # nothing else arrives
    [(_, headers, body)] = receiver.requests
    assert verify_signature(secret, headers["X-Forecast-Signature"], body)
    assert orjson.loads(body)["data"]["sensor_id"] == "ETTh1.OT"

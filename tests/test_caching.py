"""Conditional GETs on the forecast reads, in-process through the whole middleware stack
(GZip included) with the real chDB store: ETag, 304, Vary, Cache-Control, scopes, and
If-None-Match values that are not what they should be."""

from __future__ import annotations

import gzip
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecast.schemas import Prediction
from gateway.api.caching import requested_tags
from gateway.auth import Authenticator, KeyStore
from gateway.http import ApiContext, create_app
from gateway.hub import Hub
from sinks.clickhouse import Store

pytestmark = pytest.mark.integration

PREFIX = "cachetest"  # own rows in the shared store
MINE, OTHER = f"{PREFIX}.mine", f"{PREFIX}.other"
SEQS = 30
START = (time.time() // 3600 - 3 * SEQS) * 3600  # hours ago: a settled range exists


@dataclass
class Api:
    client: httpx.AsyncClient
    hub: Hub
    admin: dict
    scoped: dict
    scoped_token: str


def prediction(sensor: str, seq: int) -> Prediction:
    ts = START + 3600 * seq
    value = float(seq) + (0.5 if sensor == OTHER else 0.0)
    return Prediction(
        sensor, ts, ts + 0.5, "lstm", 1, 3600.0, [value] * 24, [0.0] * 24, [99.0] * 24, seq
    )


def publish(hub: Hub, p: Prediction) -> None:
    hub.publish_prediction(p.to_message(), orjson.dumps(p.to_message()))


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory, store: Store) -> tuple:
    keys = KeyStore(tmp_path_factory.mktemp("caching") / "keys.db")
    admin = keys.create("admin", "admin")[1]
    scoped = keys.create("viewer", "mine-only", scopes=(f"{PREFIX}.m*",))[1]
    published = [prediction(s, seq) for seq in range(1, SEQS + 1) for s in (MINE, OTHER)]
    store.write_batch([], published, token=f"caching-{PREFIX}")
    hub = Hub()
    for p in published:
        publish(hub, p)
    ctx = ApiContext(auth=Authenticator(keys), hub=hub, store=store)
    return create_app(ctx, rate="100000/minute"), hub, admin, scoped


@pytest.fixture
async def api(parts: tuple) -> AsyncIterator[Api]:
    app, hub, admin, scoped = parts
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield Api(client, hub, bearer(admin), bearer(scoped), scoped)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def latest(sensor: str) -> str:
    return f"/v1/sensors/{sensor}/forecast"


async def test_latest_answers_304_on_a_matching_tag_and_changes_with_a_prediction(api) -> None:
    first = await api.client.get(latest(MINE), headers=api.admin)
    assert first.status_code == 200 and first.json()["seq"] == SEQS
    tag = first.headers["etag"]
    assert tag.startswith('W/"') and tag.endswith('"')
    assert first.headers["cache-control"] == "private, max-age=1"
    assert "Authorization" in first.headers["vary"]

    for held in (tag, tag.removeprefix("W/"), f'"nope", {tag}', "*", f" ,, {tag} , "):
        again = await api.client.get(latest(MINE), headers={**api.admin, "If-None-Match": held})
        assert again.status_code == 304, held
        assert again.content == b"" and "content-length" not in again.headers
        assert again.headers["etag"] == tag
        assert again.headers["cache-control"] == "private, max-age=1"
        assert "Authorization" in again.headers["vary"]
    two_lines = [("Authorization", api.admin["Authorization"])]
    two_lines += [("If-None-Match", '"nope"'), ("If-None-Match", tag)]
    assert (await api.client.get(latest(MINE), headers=two_lines)).status_code == 304
    head = await api.client.head(latest(MINE), headers={**api.admin, "If-None-Match": tag})
    assert head.status_code == 304 and head.headers["etag"] == tag
    other = await api.client.get(latest(MINE), headers={**api.admin, "If-None-Match": '"nope"'})
    assert other.status_code == 200 and other.headers["etag"] == tag

    publish(api.hub, prediction(MINE, SEQS + 1))
    newer = await api.client.get(latest(MINE), headers={**api.admin, "If-None-Match": tag})
    assert newer.status_code == 200 and newer.json()["seq"] == SEQS + 1
    assert newer.headers["etag"] != tag
    held = {**api.admin, "If-None-Match": newer.headers["etag"]}
    assert (await api.client.get(latest(MINE), headers=held)).status_code == 304


async def test_a_scoped_caller_learns_nothing_of_another_scope_from_tags(api) -> None:
    theirs = await api.client.get(latest(OTHER), headers=api.admin)
    mine = await api.client.get(latest(MINE), headers=api.scoped)
    assert mine.status_code == 200 and mine.json()["sensor_id"] == MINE
    assert mine.headers["etag"] != theirs.headers["etag"]
    for held in (theirs.headers["etag"], "*"):
        headers = {**api.scoped, "If-None-Match": held}
        for path in (latest(OTHER), f"/v1/sensors/{OTHER}/forecasts"):
            hidden = await api.client.get(path, headers=headers)
            assert hidden.status_code == 404, path
            assert "etag" not in hidden.headers and OTHER.encode() in hidden.content
            assert b"yhat" not in hidden.content
    # the same answer, so the same tag, to every caller that may see it
    assert (
        mine.headers["etag"]
        == (await api.client.get(latest(MINE), headers=api.admin)).headers["etag"]
    )
    unauthenticated = await api.client.get(latest(MINE), headers={"If-None-Match": "*"})
    assert unauthenticated.status_code == 401 and "etag" not in unauthenticated.headers


async def test_credentials_in_the_url_are_never_stored(api) -> None:
    answer = await api.client.get(latest(MINE), params={"token": api.scoped_token})
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"
    assert "Authorization" in answer.headers["vary"]


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "W/",
        '"unterminated',
        'W/"a" "b"',  # no comma between
        '"a" , W/b',
        "*, " + '"a"',
        '"\x01"',
        '"a""b"',
        "",
        " ",
        '"' + "x" * 10_000 + '"',
        ", ".join(['"x"'] * 3000),
    ],
)
async def test_a_malformed_if_none_match_is_ignored(api, value: str) -> None:
    tag = (await api.client.get(latest(MINE), headers=api.admin)).headers["etag"]
    if value == "*, " + '"a"':
        value += f", {tag}"  # a list with * inside is not the * form
    answer = await api.client.get(
        latest(MINE), headers={**api.admin, "If-None-Match": value.encode("latin-1")}
    )
    assert answer.status_code == 200 and answer.json()["sensor_id"] == MINE
    assert answer.headers["etag"] == tag


async def test_history_is_conditional_and_survives_gzip(api) -> None:
    path = f"/v1/sensors/{MINE}/forecasts"
    headers = {**api.admin, "Accept-Encoding": "gzip"}
    first = await api.client.get(path, headers=headers)
    assert first.status_code == 200 and len(first.json()["forecasts"]) >= SEQS
    assert first.headers["content-encoding"] == "gzip"  # a large body goes out compressed
    assert {"Authorization", "Accept-Encoding"} <= {
        v.strip() for v in first.headers["vary"].split(",")
    }
    assert first.headers["cache-control"] == "private, max-age=1"  # open-ended: still growing
    tag = first.headers["etag"]
    assert tag.startswith('W/"')
    again = await api.client.get(path, headers={**headers, "If-None-Match": tag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == tag and "content-encoding" not in again.headers
    assert again.headers["vary"] == "Authorization, Accept-Encoding"  # as its 200 said
    plain = await api.client.get(path, headers={**api.admin, "Accept-Encoding": "identity"})
    assert plain.headers["etag"] == tag and "content-encoding" not in plain.headers
    assert orjson.loads(plain.content) == first.json()
    with pytest.raises(gzip.BadGzipFile):
        gzip.decompress(plain.content)

    stop = datetime.fromtimestamp(START + 3600 * (SEQS // 2), UTC).isoformat()
    settled = await api.client.get(path, params={"to": stop}, headers=api.admin)
    assert settled.headers["cache-control"] == "private, max-age=60"
    assert settled.headers["etag"] != tag  # another range, another answer
    held = {**api.admin, "If-None-Match": settled.headers["etag"]}
    assert (await api.client.get(path, params={"to": stop}, headers=held)).status_code == 304
    limited = await api.client.get(path, params={"to": stop, "limit": 3}, headers=held)
    assert limited.status_code == 200 and len(limited.json()["forecasts"]) == 3


def test_if_none_match_lists_are_parsed_per_rfc_9110() -> None:
    assert requested_tags("*") == {"*"}
    assert requested_tags(' W/"a", "b,c" ,,"" ') == {'"a"', '"b,c"', '""'}
    assert requested_tags('W/"a";"b"') is None
    assert requested_tags("W/a") is None


@given(st.text(max_size=80))
def test_any_if_none_match_is_parsed_without_error(value: str) -> None:
    tags = requested_tags(value)
    assert tags is None or all(t == "*" or (t[0] == t[-1] == '"') for t in tags)

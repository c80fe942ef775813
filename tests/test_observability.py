"""Observability: a batch's trace crosses the Kafka hop (in-memory exporter), both
metrics endpoints pass promtool, logs carry trace and request ids."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from forecast.metrics import REGISTRY
from forecast.settings import load_settings
from gateway.feed import Feed
from gateway.hub import Hub
from models.baseline import SeasonalNaive
from streams.broker import EmbeddedBroker, ensure_topics
from streams.pipeline import ModelSet
from streams.worker import Worker
from tests.conftest import ETTH1, base_env, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """One provider per process (OpenTelemetry allows one), exporting to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


async def test_a_batch_trace_crosses_the_kafka_hop(spans, tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, kafka_partitions=1, kafka_session_timeout=2)
    async with EmbeddedBroker() as broker:
        await ensure_topics(broker.bootstrap, settings)
        feed = Feed(settings, broker.bootstrap, Hub())
        await feed.start()
        models = ModelSet(SeasonalNaive(horizon=3, season=2))
        worker = Worker(settings, broker.bootstrap, lambda: models)
        await worker.start()
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            tracer = trace.get_tracer("a sensor")
            for i in range(3):
                with tracer.start_as_current_span("sensor.send"):
                    carrier: dict[str, str] = {}
                    propagate.inject(carrier)
                    value = orjson.dumps({"sensor_id": "traced", "ts": 1e9 + 60 * i, "value": i})
                    headers = [(k, v.encode()) for k, v in carrier.items()]
                    await producer.send_and_wait("readings", value, b"traced", headers=headers)
            deadline = time.monotonic() + 60
            while not any(s.name == "deliver" for s in spans.get_finished_spans()):
                assert time.monotonic() < deadline, "no delivery span"
                await asyncio.sleep(0.2)
        finally:
            await producer.stop()
            await worker.stop()
            await feed.stop()
    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}
    deliver = next(s for s in finished if s.name == "deliver")
    publish = by_id[deliver.parent.span_id]  # across Kafka, through `traceparent`
    assert publish.name == "publish"
    batch = by_id[publish.parent.span_id]
    assert batch.name == "batch" and batch.parent is None
    children = {s.name for s in finished if s.parent and s.parent.span_id == batch.context.span_id}
    assert {"ingest", "inference", "features", "publish"} <= children
    assert deliver.context.trace_id == batch.context.trace_id
    producers = {s.context.span_id for s in finished if s.name == "sensor.send"}
    assert {link.context.span_id for link in batch.links} & producers


def start_part(part: str, data_dir: Path, **env: str) -> tuple[subprocess.Popen, str]:
    with (data_dir / f"{part}.log").open("w") as log:  # the child keeps its own handle
        process = subprocess.Popen(
            [sys.executable, "-m", "forecast", part],
            env=base_env(data_dir, **env),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    http = None
    for line in process.stdout:
        if line.startswith("http:"):
            http = line.split()[1]
        if line.startswith("ready"):
            return process, http
    raise RuntimeError(f"forecast {part} exited: {(data_dir / f'{part}.log').read_text()[-2000:]}")


@pytest.fixture(scope="module")
def split(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A worker and a gateway as separate processes, as on a cluster."""
    env = {"FORECAST_KAFKA_BOOTSTRAP": broker, "FORECAST_TOPIC_PREFIX": "split."}
    worker, worker_http = start_part("worker", tmp_path_factory.mktemp("worker"), **env)
    gateway_dir = tmp_path_factory.mktemp("gateway")
    gateway, gateway_http = start_part("gateway", gateway_dir, **env)
    yield {
        "worker": worker_http,
        "gateway": gateway_http,
        "gateway_log": str(gateway_dir / "gateway.log"),
        **env,
    }
    for process in (gateway, worker):
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        process.stdout.close()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs Debian's prometheus")
def test_promtool_accepts_the_worker_and_the_gateway_metrics(split, tmp_path: Path) -> None:
    env = base_env(tmp_path, **{k: v for k, v in split.items() if k.startswith("FORECAST_")})
    assert run_cli("replay", str(ETTH1), "--limit", "50", env=env).returncode == 0
    deadline = time.monotonic() + 60
    while "forecast_event_to_prediction_seconds_count" not in _metrics(split["worker"]):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    for part in ("worker", "gateway"):
        text = _metrics(split[part])
        checked = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert checked.returncode == 0, f"{part}: {checked.stdout}{checked.stderr}"
    worker = _metrics(split["worker"])
    for name in (
        'forecast_consumer_lag{partition="0",topic="split.readings"}',
        "forecast_sink_flush_seconds_count",
        'forecast_inference_seconds_count{model="baseline"}',
        'forecast_readings_total{reason="",result="accepted"}',
        "forecast_model_info",
    ):
        assert name in worker, name
    assert "forecast_ws_connections" in _metrics(split["gateway"])


def test_every_registered_metric_is_documented() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    names = {m.name for m in REGISTRY.collect()}
    missing = sorted(n for n in names if n not in readme)
    assert not missing, f"not in the README: {missing}"


def test_logs_carry_request_ids(split) -> None:
    response = httpx.get(f"{split['gateway']}/v1/sensors", headers={"X-Request-ID": "req-42"})
    assert response.headers["X-Request-ID"] == "req-42"
    deadline = time.monotonic() + 10  # the access line is written once the answer is sent
    while True:
        log = Path(split["gateway_log"]).read_text()
        lines = [json.loads(line) for line in log.splitlines() if "req-42" in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert lines and lines[-1]["request_id"] == "req-42"
    assert re.search(r"GET /v1/sensors 401", lines[-1]["message"])


def _metrics(base: str) -> str:
    return httpx.get(f"{base}/metrics").text

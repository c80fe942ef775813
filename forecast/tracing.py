"""OpenTelemetry tracing, off by default.

``OTEL_TRACES_EXPORTER=otlp`` (endpoint, headers and the rest from the standard
``OTEL_EXPORTER_OTLP_*`` variables) or ``console`` turns it on; ``OTEL_SERVICE_NAME``
names the process. Trace context crosses Kafka in the W3C ``traceparent`` header: a
reading's producer may send one (the worker's batch span links to it), and every
prediction carries the worker's publish span, which the gateway's delivery span
continues.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from opentelemetry import propagate, trace
from opentelemetry.context import Context

from forecast.errors import ConfigError

TRACER = trace.get_tracer("forecast")
HEADER = "traceparent"


def setup(service: str) -> bool:
    """Install a tracer provider if an exporter is configured; True if tracing is on."""
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if exporter_name in ("", "none"):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    elif exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: expected otlp, console or none")
    name = os.environ.get("OTEL_SERVICE_NAME", f"forecast-{service}")
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True


def shutdown() -> None:
    """Export what is still buffered."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def extract(headers: Iterable[tuple[str, bytes]] | None) -> Context | None:
    """The trace context a Kafka record carries, if any."""
    carrier = {k: v.decode("latin-1") for k, v in headers or () if k == HEADER}
    return propagate.extract(carrier) if carrier else None


def inject() -> list[tuple[str, bytes]]:
    """Headers that carry the current span to the next hop (none when tracing is off)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [(k, v.encode("latin-1")) for k, v in carrier.items()]

"""Traces (OpenTelemetry): off unless the standard OTEL_* variables ask for them.

Spans, when a tracer provider is installed (configure_tracing, or a test's own):

    POST /inspect                 FastAPI's own server span (it continues a caller's traceparent), with
    │                             diffad.request_id and diffad.model added; FastAPI's operation spans
    ├── decode                    (dependencies, endpoint, serialisation) sit between it and these
    ├── queue wait                enqueued -> its batch started
    ├── inference                 the batch's backend time, linked to the batch's span
    └── encode map
    batch inference               one per batch, linked to every request it computed

Without a provider the API's tracer is a no-op and the batcher records nothing: no cost when off. The
service depends only on opentelemetry-api; exporting needs the `tracing` extra (SDK and OTLP exporter).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext

from .. import __version__

log = logging.getLogger("diffad.service")
tracer = trace.get_tracer("diffad.service", __version__)  # a proxy: follows a provider installed later


def wanted_exporter(environ: Mapping[str, str]) -> str | None:
    """The span exporter the OTEL_* variables ask for: 'otlp', 'console', or None (tracing off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if names:
        if names == ["none"]:
            return None
        for name in names:
            if name not in ("otlp", "console"):
                raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: diffad exports traces with otlp or console")
        return names[0]
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return "otlp"
    return None


def configure_tracing(environ: Mapping[str, str] | None = None) -> str | None:
    """Install the SDK's tracer provider with the exporter OTEL_* names (batched export, OTEL_SERVICE_NAME
    and OTEL_RESOURCE_ATTRIBUTES read by the SDK itself); returns the exporter's name, None when off."""
    environ = os.environ if environ is None else environ
    exporter_name = wanted_exporter(environ)
    if exporter_name is None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        if exporter_name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        raise RuntimeError(f"OTEL_* variables ask for traces ({exporter_name}) but {e.name} is not installed: "
                           "pip install 'diffad[tracing]'") from None
    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME", "diffad"),
                                "service.version": __version__})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter() if exporter_name == "otlp"
                                                   else ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing: spans exported with %s (OTEL_* variables)", exporter_name)
    return exporter_name


def current_span_context() -> SpanContext:
    """The span being handled (invalid outside any, or when tracing is off)."""
    return trace.get_current_span().get_span_context()


def record_batch(model: str, contexts: list[tuple[SpanContext, int]], started_ns: int, ended_ns: int) -> None:
    """After a batch ran: its own span, linked to each request, and each traced request's queue wait and
    inference as children of that request (contexts: each request's span context and enqueue time, ns)."""
    traced = [(c, enqueued) for c, enqueued in contexts if c.is_valid]
    if not traced:
        return
    attributes = {"diffad.model": model, "diffad.batch_size": len(contexts)}
    batch = tracer.start_span("batch inference", links=[Link(c) for c, _ in traced], start_time=started_ns,
                              attributes=attributes)
    batch.end(end_time=ended_ns)
    for context, enqueued_ns in traced:
        parent = trace.set_span_in_context(NonRecordingSpan(context))
        tracer.start_span("queue wait", context=parent, start_time=enqueued_ns,
                          attributes={"diffad.model": model}).end(end_time=started_ns)
        tracer.start_span("inference", context=parent, start_time=started_ns, attributes=attributes,
                          links=[Link(batch.get_span_context())]).end(end_time=ended_ns)

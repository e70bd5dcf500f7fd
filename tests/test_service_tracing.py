"""Traces: one server span per request with its decode, queue wait, inference and map-encoding children,
a span per batch linked to its requests, the caller's traceparent continued; off without OTEL_* variables."""

import asyncio

import pytest
from diffad.service.tracing import wanted_exporter
from test_service import encode, make_settings, make_tiny_bundle, noise_image, serving, upload

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="needs opentelemetry-sdk (the dev extra)")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def spans():
    """The process's tracer provider (it can be set once), exporting into memory."""
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        pytest.skip("another tracer provider was installed in this process first")
    return exporter


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory)


def test_a_request_is_one_trace_with_its_stages_as_children(bundle_dir, spans):
    spans.clear()

    async def scenario():
        async with serving(make_settings(bundle_dir, max_batch_size=4, max_queue_delay_ms=30)) as (_, c):
            spans.clear()  # the warm-up and readiness polls are not the point here
            headers = {"X-Request-ID": "traced-1", "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
            first = c.post("/inspect", files=upload(encode(noise_image(40, 30))), headers=headers)
            second = c.post("/inspect?map=none", files=upload(encode(noise_image(40, 30, seed=1))),
                            headers={"X-Request-ID": "traced-2"})
            r1, r2 = await asyncio.gather(first, second)
            assert r1.status_code == r2.status_code == 200
    asyncio.run(scenario())

    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}
    servers = {s.attributes["diffad.request_id"]: s for s in finished
               if s.kind == trace.SpanKind.SERVER and "diffad.request_id" in s.attributes}
    assert set(servers) == {"traced-1", "traced-2"}
    one = servers["traced-1"]
    assert one.name == "POST /inspect"
    # the caller's trace goes on: same trace id, the caller's span as parent
    assert format(one.context.trace_id, "032x") == CALLER_TRACE
    assert format(one.parent.span_id, "016x") == CALLER_SPAN
    assert one.attributes["diffad.model"] == "weave"

    def under(server):
        """The spans below a server span, at any depth (FastAPI's operation spans may sit in between)."""
        found = {}
        for s in finished:
            parent = s.parent
            while parent is not None and parent.span_id in by_id and parent.span_id != server.context.span_id:
                parent = by_id[parent.span_id].parent
            if parent is not None and parent.span_id == server.context.span_id:
                found.setdefault(s.name, s)
        return found

    stages = {"decode", "queue wait", "inference", "encode map"}
    children = under(one)
    assert stages <= set(children), sorted(children)
    assert all(children[n].context.trace_id == one.context.trace_id for n in stages)
    assert children["queue wait"].end_time <= children["inference"].start_time
    two = under(servers["traced-2"])
    assert stages - {"encode map"} <= set(two) and "encode map" not in two  # map=none: nothing encoded
    # each batch span links to the requests' spans; each request's inference links back to its batch
    batches = [s for s in finished if s.name == "batch inference"]
    linked = {link.context.span_id for b in batches for link in b.links}
    assert {children["queue wait"].parent.span_id, two["queue wait"].parent.span_id} <= linked
    assert any(link.context.span_id in {b.context.span_id for b in batches} for link in children["inference"].links)


def test_probes_and_scrapes_are_not_traced(bundle_dir, spans):
    async def scenario():
        async with serving(make_settings(bundle_dir)) as (_, c):
            spans.clear()
            for path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready"):
                assert (await c.get(path)).status_code == 200
    asyncio.run(scenario())
    assert [s.name for s in spans.get_finished_spans()] == []


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, None),
])
def test_tracing_is_on_only_when_otel_variables_ask(environ, expected):
    assert wanted_exporter(environ) == expected


def test_an_unknown_exporter_is_refused_by_name():
    with pytest.raises(ValueError, match="zipkin"):
        wanted_exporter({"OTEL_TRACES_EXPORTER": "zipkin"})

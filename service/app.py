"""The FastAPI application: `create_app(settings)` builds it, its lifespan runs the models.

    app = create_app(load_settings())        # checks every bundle now: a bad one raises here
    uvicorn.run(app)                         # or `diffad serve BUNDLE_DIR...`

Startup returns at once (the server listens, /healthz answers); the models open and warm up in the
background and /readyz turns 200 when all are ready. Shutdown stops intake (503), answers what is
queued, then frees the backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from opentelemetry import trace
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from .backends import BackendFactory
from .batcher import BatcherClosedError, QueueFullError
from .deps import API_KEY_HEADER, api_key_accepted
from .logs import NO_REQUEST, REQUEST_ID_HEADER, REQUEST_ID_STATE_KEY, accepted_request_id, request_id
from .metrics import MODEL_STATE_KEY, UNKNOWN_MODEL, ServiceMetrics
from .models import ModelRegistry
from .routes import (
    ADMISSION_STATE_KEY,
    CLIENT_CLOSED_REQUEST,
    STATIC_DIR,
    TIMINGS_STATE_KEY,
    api_router,
    public_router,
    queue_full_detail,
)
from .settings import Settings
from .v2 import v2_public_router, v2_router

log = logging.getLogger("diffad.service")
access_log = logging.getLogger("diffad.access")

# Multipart framing (boundaries, part headers) on top of the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
BATCH_PATH = "/inspect/batch"
INSPECT_PATHS = ("/inspect", BATCH_PATH)  # admitted before their body is read; counted in requests_total


def create_app(settings: Settings, backend_factory: BackendFactory | None = None) -> FastAPI:
    """The service for settings.models. backend_factory(bundle, settings) -> Backend replaces the
    backend choice (tests wrap the real backend with it)."""
    metrics = ServiceMetrics()
    registry = ModelRegistry(settings, metrics, backend_factory)  # loads and verifies the bundles
    docs = not settings.api_keys  # with API keys, no unauthenticated schema or docs either
    app = FastAPI(title="diffad inspection service", version=__version__, lifespan=_lifespan,
                  description="DiffusionAD visual anomaly detection: POST an image to /inspect.",
                  docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None,
                  # FastAPI's own OpenTelemetry: a server span per request (continuing a caller's traceparent)
                  # into the provider configure_tracing installs from OTEL_*; never exporters of its own.
                  telemetry={"auto_configure": False, "exclude": _untraced})
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.web_page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    app.include_router(public_router)
    app.include_router(api_router)
    app.include_router(v2_public_router)
    app.include_router(v2_router)
    app.add_exception_handler(Exception, _internal_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
                       batch_max_bytes=settings.max_files_per_request * (settings.max_upload_bytes
                                                                         + MULTIPART_OVERHEAD_BYTES))
    app.add_middleware(AdmissionMiddleware, registry=registry, settings=settings)  # before the body is read
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)  # added last: outermost, sees every answer
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    registry: ModelRegistry = app.state.registry
    settings: Settings = app.state.settings
    app.state.decode_slots = asyncio.Semaphore(settings.max_concurrent_decodes)
    loading = asyncio.create_task(registry.start(), name="diffad-load-models")
    try:
        yield
    finally:
        registry.begin_drain()
        if not loading.done():
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
        await registry.close(timeout_s=settings.request_timeout_s)


# Starlette's words for any multipart parsing error, the cause dropped: say what usually causes it.
_STARLETTE_MULTIPART_ERROR = "Invalid multipart data."
MULTIPART_HELP = ("the upload is not valid multipart/form-data: send the image as the form field 'file'; a part "
                  "header over the parser's limit (a file name of thousands of characters, say) or a broken "
                  "boundary also give this")


async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 400 and exc.detail == _STARLETTE_MULTIPART_ERROR:
        exc = StarletteHTTPException(400, MULTIPART_HELP, headers=exc.headers)
    return await http_exception_handler(request, exc)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Outside ObservabilityMiddleware (Starlette's outermost layer answers here): the id comes from the scope.
    rid = request.scope.get("state", {}).get(REQUEST_ID_STATE_KEY, NO_REQUEST)
    log.error("unhandled error on %s %s", request.method, _printable(request.url.path), exc_info=exc,
              extra={"request_id": rid})
    return JSONResponse({"detail": "internal server error", "request_id": rid}, status_code=500,
                        headers={REQUEST_ID_HEADER: rid})


def _printable(text: str, limit: int = 200) -> str:
    """Request-supplied text for a log line: escaped (repr) and bounded, so it cannot forge lines."""
    escaped = repr(text[:limit])[1:-1]
    return escaped + ("..." if len(text) > limit else "")


class BodySizeLimitMiddleware:
    """413 for a body over max_bytes (batch_max_bytes for POST /inspect/batch): at once from Content-Length,
    else while it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int, batch_max_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.batch_max_bytes = batch_max_bytes or max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.batch_max_bytes if scope.get("path") == BATCH_PATH else self.max_bytes
        detail = f"request body larger than {max_bytes} bytes"
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > max_bytes:
                # Read and dropped (never parsed), so that a client still sending reads the 413, not a reset.
                await _discard_body(scope, receive, TOO_LARGE_DISCARD_LIMIT)
                response = JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})
                return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise HTTPException(413, detail)  # FastAPI re-raises it from body parsing: a JSON 413
            return message

        await self.app(scope, limited_receive, send)


class AdmissionMiddleware:
    """429 for POST /inspect (and /inspect/batch) before a byte of its body is read, when the model's queue is
    full counting the requests still being read and decoded; otherwise the request holds a place until it is
    queued (a batch's first file takes it; each further file takes its own place or gets its own 429).

    FastAPI reads and parses a multipart body before the route (and its dependencies) run: refusing there
    would cost the upload's transfer and parsing, nearly what serving it costs. What this cannot judge (an
    unknown or ambiguous model, a model not ready, a missing API key) it leaves to the route.
    """

    def __init__(self, app: ASGIApp, registry: ModelRegistry, settings: Settings):
        self.app = app
        self.registry = registry
        self.settings = settings

    def _runtime(self, scope: Scope):
        names = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("model")
        runtime = self.registry.find(names[0] if names else None)
        if runtime is None or not runtime.ready or runtime.batcher is None or self.registry.draining:
            return None
        if self.settings.api_keys:
            key = next((v.decode("latin-1") for k, v in scope["headers"] if k == API_KEY_HEADER.lower().encode()),
                       None)
            if not api_key_accepted(self.settings, key):
                return None  # the route answers 401; an unauthenticated upload holds no place
        return runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in INSPECT_PATHS or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        runtime = self._runtime(scope)
        if runtime is None:
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state[MODEL_STATE_KEY] = runtime.name  # the requests_total label, whatever happens next
        try:
            admission = runtime.batcher.admit()
        except (QueueFullError, BatcherClosedError) as e:
            full = isinstance(e, QueueFullError)
            detail = queue_full_detail(runtime, self.settings) if full else "the service is shutting down"
            headers = {"Retry-After": str(e.retry_after_s) if full else "1"}
            if await _discard_body(scope, receive, DISCARD_BODY_LIMIT):
                # A client still sending would read a reset, not the answer: a small body is read and
                # dropped (never parsed or decoded); a large one is left unread and the connection closed.
                headers["Connection"] = "close"
            response = JSONResponse({"detail": detail}, status_code=429 if full else 503, headers=headers)
            return await response(scope, receive, send)
        state[ADMISSION_STATE_KEY] = admission
        try:
            await self.app(scope, receive, send)
        finally:
            admission.release()


# A refused upload up to this size is read and dropped so that its client reads the refusal; above, the
# connection is closed instead of spending the transfer. A 429 under overload must stay cheap: 1 MiB. A
# 413 is rare and its client would otherwise see only a reset: up to 64 MiB (nginx's lingering close too
# reads what a refused client still sends), never buffered, never parsed.
DISCARD_BODY_LIMIT = 1 << 20
TOO_LARGE_DISCARD_LIMIT = 64 << 20


async def _discard_body(scope: Scope, receive: Receive, limit: int) -> bool:
    """Read and drop the request body when it is declared and at most `limit` bytes; True when it was left
    unread."""
    declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    if declared is None or not declared.isdigit() or int(declared) > limit:
        return True
    received = 0
    while received <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return True
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return False
    return True


class ObservabilityMiddleware:
    """Outermost, so it sees every answer: the request id, the access log line and diffad_requests_total.

    The id (the client's X-Request-ID when plausible, else a new one) is set for every log line written while
    the request is handled, sent back as X-Request-ID, and added as request_id to every JSON error body.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = accepted_request_id(given)
        state = scope.setdefault("state", {})
        state[REQUEST_ID_STATE_KEY] = rid
        token = request_id.set(rid)
        server_span = trace.get_current_span()  # FastAPI's own server span, when traces are on
        status = CLIENT_CLOSED_REQUEST  # until a response starts
        held_start: Message | None = None  # an error's start, held until its body has the request id
        held_body: list[bytes] = []

        async def send_and_record(message: Message) -> None:
            nonlocal status, held_start
            if message["type"] == "http.response.start":
                status = message["status"]
                if server_span.is_recording() and MODEL_STATE_KEY in state:  # FastAPI ends it with the answer
                    server_span.set_attribute("diffad.model", state[MODEL_STATE_KEY])
                message = {**message, "headers": _with_header(message.get("headers", []), b"x-request-id",
                                                              rid.encode("latin-1"))}
                if status >= 400 and (_header(message["headers"], b"content-type") or b"").startswith(
                        b"application/json"):
                    held_start = message
                    return
            elif message["type"] == "http.response.body" and held_start is not None:
                held_body.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = _with_request_id(b"".join(held_body), rid)
                start, held_start = held_start, None
                await send({**start, "headers": _with_header(start["headers"], b"content-length",
                                                             str(len(body)).encode())})
                message = {"type": "http.response.body", "body": body}
            await send(message)

        path, model = scope.get("path", ""), None
        if server_span.is_recording():
            server_span.set_attribute("diffad.request_id", rid)
        try:
            await self.app(scope, receive, send_and_record)
        except Exception:
            status = 500
            raise
        finally:
            model = state.get(MODEL_STATE_KEY)
            if _counted(path):
                self.metrics.requests.labels(model or UNKNOWN_MODEL, str(status)).inc()
            if access_log.isEnabledFor(logging.INFO):
                _log_access(scope, status, (time.perf_counter() - started) * 1e3, model,
                            state.get(TIMINGS_STATE_KEY))
            request_id.reset(token)


# Probes and scrapes are not traced: a span every few seconds per instance says nothing.
UNTRACED_PATHS = frozenset({"/metrics", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})


def _untraced(scope) -> bool:
    return scope.get("path") in UNTRACED_PATHS


def _counted(path: str) -> bool:
    """The inference requests that diffad_requests_total counts: /inspect, /inspect/batch and v2 infer."""
    return path in INSPECT_PATHS or (path.startswith("/v2/models/") and path.endswith("/infer"))


def _log_access(scope: Scope, status: int, duration_ms: float, model: str | None, timings: dict | None) -> None:
    """One line per request; in JSON logs its parts are keys of their own (method, path, status, latencies)."""
    client = (scope.get("client") or ("-", 0))[0]
    method, path = scope.get("method", "-"), _printable(scope.get("path", ""))
    query = _printable(scope.get("query_string", b"").decode("latin-1"))
    fields = {"client": client, "method": method, "path": path, "query": query, "status": status,
              "duration_ms": round(duration_ms, 3)}
    text = f'{client} "{method} {path}{"?" + query if query else ""}" {status} {duration_ms:.1f}ms'
    if model is not None:
        fields["model"] = model
        text += f" model={model}"
    if timings:
        fields.update(timings)
        text += (f" batch={timings['batch_size']} queue={timings['queue_ms']:.1f}ms"
                 f" inference={timings['inference_ms']:.1f}ms")
    access_log.info("%s", text, extra=fields)


def _header(headers, name: bytes) -> bytes | None:
    return next((v for k, v in headers if k.lower() == name), None)


def _with_header(headers, name: bytes, value: bytes) -> list:
    return [(k, v) for k, v in headers if k.lower() != name] + [(name, value)]


def _with_request_id(body: bytes, rid: str) -> bytes:
    """A JSON error body with request_id added (a body that is not a JSON object is left as it is)."""
    try:
        content = json.loads(body)
    except ValueError:
        return body
    if not isinstance(content, dict):
        return body
    content.setdefault("request_id", rid)
    return json.dumps(content, separators=(",", ":")).encode()

"""HTTP routes. Public: /healthz, /readyz, /metrics and the web page; behind the API key: /models, /inspect."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..export.bundle import Bundle
from .batcher import (
    Admission,
    BatcherClosedError,
    InferenceError,
    InferenceResult,
    QueueFullError,
    RequestTimeoutError,
    UpstreamError,
    wait_for_result,
)
from .deps import API_KEY_HEADER, MetricsDep, RegistryDep, SettingsDep, api_key_accepted, require_api_key
from .images import ImageError, check_content_type, decode_image, encode_map_png, map_size
from .metrics import MODEL_STATE_KEY
from .models import ModelRegistry, ReloadError, ServedModel, queue_image
from .schemas import (
    BatchInspectResponse,
    BatchItem,
    BatchItemError,
    InspectResponse,
    Liveness,
    ModelInfo,
    ModelList,
    ReloadResponse,
    Timings,
)
from .settings import Settings
from .tracing import tracer

STATIC_DIR = Path(__file__).parent / "static"
CLIENT_CLOSED_REQUEST = 499  # nginx's code for "the client went away first"; only ever seen in metrics
ADMISSION_STATE_KEY = "diffad_admission"  # the place AdmissionMiddleware holds for the request
TIMINGS_STATE_KEY = "diffad_timings"  # queue and inference time and batch size, for the access log

public_router = APIRouter()
api_router = APIRouter(dependencies=[Depends(require_api_key)])


class ClientDisconnected(Exception):
    pass


# --- public --------------------------------------------------------------------------------------
@public_router.get("/healthz", response_model=Liveness, tags=["health"], summary="the process is alive")
async def healthz() -> Liveness:
    return Liveness()


_PATH = re.compile(r"[^\s'\"()]*[/\\][^\s'\"()]*")  # any word with a slash in it: a path, absolute or not


@public_router.get("/readyz", tags=["health"], summary="200 while at least one model (or the one named) serves",
                   responses={503: {"description": "loading, failed, reloading, or shutting down"},
                              404: {"description": "unknown model"}})
async def readyz(request: Request, registry: RegistryDep, settings: SettingsDep,
                 model: Annotated[str | None, Query(max_length=256, description="this model only")] = None
                 ) -> JSONResponse:
    if model is not None and model not in registry.models:
        raise HTTPException(404, f"unknown model {model[:64]!r}")
    status = registry.status(model)
    if not api_key_accepted(settings, request.headers.get(API_KEY_HEADER)) or not settings.api_keys:
        # Errors name files and folders: only a caller with an API key reads them whole.
        for entry in status["models"].values():
            if "error" in entry:
                entry["error"] = _PATH.sub("<path>", entry["error"])
    if status["ready"]:
        return JSONResponse(status)
    return JSONResponse({"detail": status}, status_code=503)


@public_router.get("/metrics", tags=["health"], summary="Prometheus metrics")
def metrics_exposition(metrics: MetricsDep) -> Response:
    return Response(metrics.exposition(), media_type=metrics.content_type)


_PAGE_HEADERS = {
    # The page is self-contained: inline script and style, images from data: and blob: URLs only.
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


@public_router.get("/", include_in_schema=False)
def web_page(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.web_page, headers=_PAGE_HEADERS)


# --- API -----------------------------------------------------------------------------------------
@api_router.get("/models", response_model=ModelList, tags=["models"], summary="the models served")
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(models=[ModelInfo(**m.info()) for m in registry.models.values()])


@api_router.post("/models/{name}/reload", response_model=ReloadResponse, response_model_exclude_unset=True,
                 tags=["models"], summary="serve the new version of a bundle without a restart",
                 responses={404: {"description": "unknown model"},
                            409: {"description": "the new version did not load, verify or warm up: the old serves"},
                            503: {"description": "shutting down"}})
async def reload_model(name: str, registry: RegistryDep) -> ReloadResponse:
    """Load the model's bundle folder again; a new version (another ONNX hash) is verified and warmed up
    beside the old one, then takes the traffic; the old one finishes what it holds."""
    if name not in registry.models:
        raise HTTPException(404, f"unknown model {name[:64]!r}; loaded: {', '.join(sorted(registry.models))}")
    try:
        return ReloadResponse(**await registry.reload(name))
    except ReloadError as e:
        raise HTTPException(e.status, e.detail) from None


def resolve_model(registry: ModelRegistry, name: str | None) -> ServedModel:
    runtime = registry.find(name)
    if runtime is None and name is None:
        raise HTTPException(422, f"several models are loaded ({', '.join(sorted(registry.models))}): "
                                 "choose one with ?model=")
    if runtime is None:
        raise HTTPException(404, f"unknown model {name[:64]!r}; loaded: {', '.join(sorted(registry.models))}")
    return runtime


def queue_full_detail(runtime: ServedModel, settings: Settings) -> str:
    return f"model {runtime.name} is at its queue limit ({settings.max_queue_size})"


async def _until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so receive() waits for that alone)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work):
    """The result of `work` (a coroutine or future); if the client disconnects first, the work is cancelled
    (queued images are then skipped by the batcher) and ClientDisconnected raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


ERROR_RESPONSES = {
    400: {"description": "the upload is not a decodable image"},
    401: {"description": "missing or wrong X-API-Key (when keys are configured)"},
    404: {"description": "unknown model"},
    413: {"description": "upload larger than DIFFAD_MAX_UPLOAD_BYTES or image over DIFFAD_MAX_IMAGE_PIXELS"},
    415: {"description": "not PNG, JPEG, BMP or TIFF"},
    422: {"description": "bad query parameters, missing file, or model not chosen among several"},
    429: {"description": "the model's queue is full; see Retry-After"},
    503: {"description": "the model is not ready or the service is shutting down"},
    504: {"description": "the request outlived DIFFAD_REQUEST_TIMEOUT_S"},
}


@api_router.post("/inspect", response_model=InspectResponse, response_model_exclude_unset=True, tags=["inspect"],
                 summary="score one image and map its anomalies", responses=ERROR_RESPONSES)
async def inspect(
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    file: Annotated[UploadFile, File(description="the image: PNG, JPEG, BMP or TIFF")],
    model: Annotated[str | None, Query(max_length=256, description="required when several models are loaded")] = None,
    threshold: Annotated[float | None, Query(ge=0.0, le=1.0, allow_inf_nan=False,
                                             description="overrides the bundle's; raw scores lie in [0, 1]")] = None,
    map_format: Annotated[Literal["png", "none"], Query(alias="map", description="png or none")] = "png",
) -> InspectResponse | Response:
    started = time.perf_counter()
    runtime = resolve_model(registry, model)
    setattr(request.state, MODEL_STATE_KEY, runtime.name)  # the requests_total label (see app.py)
    admission = getattr(request.state, ADMISSION_STATE_KEY, None)
    try:
        _check_serving(registry, runtime, admission)
        deadline = time.monotonic() + settings.request_timeout_s
        decoded = await _decode_upload(request, runtime, settings, file)
        bundle, queued = queue_image(runtime, decoded.array, deadline, admission)
        try:
            result = await _unless_disconnected(request, wait_for_result(queued, deadline))
        finally:
            queued.cancel()  # nothing once answered; if the client left first, the batcher skips the image
        body = await _result_body(request, runtime.name, bundle, settings, result, decoded, threshold, map_format,
                                  started)
        timings = body["timings_ms"]
        setattr(request.state, TIMINGS_STATE_KEY, {"queue_ms": timings.queue, "inference_ms": timings.inference,
                                                   "batch_size": result.batch_size})
        return InspectResponse(**body)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody is listening; the server drops it
    except Exception as e:
        http = http_error_for(e, runtime, settings)
        if http is None:
            raise
        raise http from None
    finally:
        metrics.request_duration.labels(runtime.name).observe(time.perf_counter() - started)


@api_router.post("/inspect/batch", response_model=BatchInspectResponse, response_model_exclude_unset=True,
                 tags=["inspect"], summary="several images of one part in one request, each scored and mapped",
                 responses=ERROR_RESPONSES)
async def inspect_batch(
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    files: Annotated[list[UploadFile], File(description="the images (repeat the field): PNG, JPEG, BMP or TIFF")],
    model: Annotated[str | None, Query(max_length=256, description="required when several models are loaded")] = None,
    threshold: Annotated[float | None, Query(ge=0.0, le=1.0, allow_inf_nan=False,
                                             description="overrides the bundle's; raw scores lie in [0, 1]")] = None,
    map_format: Annotated[Literal["png", "none"], Query(alias="map", description="png or none")] = "png",
) -> BatchInspectResponse | Response:
    """Each file goes through what /inspect does (a place in the queue, decoding and its limits, the dynamic
    batcher, the deadline) at the same time as the others; the answer lists, in the order sent, each file's
    result or its error, so one bad file does not fail the rest."""
    started = time.perf_counter()
    runtime = resolve_model(registry, model)
    setattr(request.state, MODEL_STATE_KEY, runtime.name)
    admission = getattr(request.state, ADMISSION_STATE_KEY, None)
    try:
        if len(files) > settings.max_files_per_request:
            raise HTTPException(413, f"{len(files)} files; at most {settings.max_files_per_request} per request "
                                     "(DIFFAD_MAX_FILES_PER_REQUEST)")
        _check_serving(registry, runtime, admission)
        deadline = time.monotonic() + settings.request_timeout_s

        async def one(index: int, file: UploadFile, place: Admission | None) -> BatchItem:
            item_started = time.perf_counter()
            try:
                place = place or runtime.batcher.admit()  # the first file has the request's place
                try:
                    decoded = await _decode_upload(request, runtime, settings, file)
                    bundle, queued = queue_image(runtime, decoded.array, deadline, place)
                    result = await wait_for_result(queued, deadline)
                finally:
                    place.release()
                body = await _result_body(request, runtime.name, bundle, settings, result, decoded, threshold,
                                          map_format, item_started)
                return BatchItem(index=index, filename=file.filename, result=InspectResponse(**body))
            except Exception as e:
                http = http_error_for(e, runtime, settings)
                if http is None:
                    raise
                return BatchItem(index=index, filename=file.filename,
                                 error=BatchItemError(status=http.status_code, detail=str(http.detail)))

        try:
            items = await _unless_disconnected(request, asyncio.gather(
                *(one(i, f, admission if i == 0 else None) for i, f in enumerate(files))))
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return BatchInspectResponse(model=runtime.name, results=items)
    finally:
        metrics.request_duration.labels(runtime.name).observe(time.perf_counter() - started)


def _check_serving(registry: ModelRegistry, runtime: ServedModel, admission: Admission | None) -> None:
    if registry.draining and admission is None:  # one admitted before the drain is served
        raise HTTPException(503, "the service is shutting down", headers={"Retry-After": "1"})
    if not runtime.ready:
        raise HTTPException(503, f"model {runtime.name} is {runtime.state}", headers={"Retry-After": "5"})


async def _decode_upload(request: Request, runtime: ServedModel, settings: Settings, file: UploadFile):
    check_content_type(file.content_type)
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ImageError(413, f"upload larger than {settings.max_upload_bytes} bytes")
    spec = runtime.bundle.input
    async with request.app.state.decode_slots:  # bounded: decoding is where memory goes
        with tracer.start_as_current_span("decode", attributes={"diffad.upload_bytes": len(data)}):
            return await run_in_threadpool(decode_image, data, spec.size, spec.channels, settings.max_image_pixels)


async def _result_body(request: Request, name: str, bundle: Bundle, settings: Settings, result: InferenceResult,
                       decoded, threshold: float | None, map_format: str, started: float) -> dict:
    """The answer to one image, by the version (bundle) that computed it: its id, threshold and calibration."""
    body = _answer(name, bundle, result, decoded.width, decoded.height, threshold)
    if map_format == "png":
        map_width, map_height = map_size(decoded.width, decoded.height, settings.max_map_pixels)
        async with request.app.state.decode_slots:
            with tracer.start_as_current_span("encode map"):
                body["anomaly_map"] = await run_in_threadpool(encode_map_png, result.anomaly_map, map_width,
                                                              map_height)
        body["map_width"], body["map_height"] = map_width, map_height
    body["timings_ms"] = Timings(queue=round(result.queue_s * 1e3, 3), inference=round(result.inference_s * 1e3, 3),
                                 total=round((time.perf_counter() - started) * 1e3, 3))
    return body


def http_error_for(error: Exception, runtime: ServedModel, settings: Settings) -> HTTPException | None:
    """The answer for what can go wrong with one image; None for anything else (a bug: a 500 and a log)."""
    if isinstance(error, HTTPException):
        return error
    if isinstance(error, ImageError):
        return HTTPException(error.status_code, error.detail)
    if isinstance(error, QueueFullError):
        return HTTPException(429, queue_full_detail(runtime, settings),
                             headers={"Retry-After": str(error.retry_after_s)})
    if isinstance(error, RequestTimeoutError):
        return HTTPException(504, f"no answer within {settings.request_timeout_s:g} s")
    if isinstance(error, UpstreamError):
        headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
        return HTTPException(error.status, error.detail, headers=headers)
    if isinstance(error, InferenceError):
        return HTTPException(500, str(error))
    if isinstance(error, BatcherClosedError):
        return HTTPException(503, "the service is shutting down", headers={"Retry-After": "1"})
    return None


def _answer(name: str, bundle: Bundle, result: InferenceResult, width: int, height: int,
            threshold: float | None) -> dict:
    applied = threshold if threshold is not None else bundle.threshold
    return {
        "model": name,
        "model_version": bundle.version,
        "image_score": result.score,
        "normalized_score": float(bundle.normalize_score(result.score)) if bundle.calibrated else None,
        "threshold": applied,
        "is_anomalous": None if applied is None else bool(result.score >= applied),
        "width": width,
        "height": height,
    }

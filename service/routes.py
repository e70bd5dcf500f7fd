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

from .batcher import BatcherClosedError, InferenceError, InferenceResult, QueueFullError, RequestTimeoutError
from .deps import API_KEY_HEADER, MetricsDep, RegistryDep, SettingsDep, api_key_accepted, require_api_key
from .images import ImageError, check_content_type, decode_image, encode_map_png, map_size
from .metrics import MODEL_STATE_KEY
from .models import ModelRegistry, ModelRuntime
from .schemas import InspectResponse, Liveness, ModelInfo, ModelList, Timings
from .settings import Settings

STATIC_DIR = Path(__file__).parent / "static"
CLIENT_CLOSED_REQUEST = 499  # nginx's code for "the client went away first"; only ever seen in metrics
ADMISSION_STATE_KEY = "diffad_admission"  # the place AdmissionMiddleware holds for the request

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


def resolve_model(registry: ModelRegistry, name: str | None) -> ModelRuntime:
    runtime = registry.find(name)
    if runtime is None and name is None:
        raise HTTPException(422, f"several models are loaded ({', '.join(sorted(registry.models))}): "
                                 "choose one with ?model=")
    if runtime is None:
        raise HTTPException(404, f"unknown model {name[:64]!r}; loaded: {', '.join(sorted(registry.models))}")
    return runtime


def queue_full_detail(runtime: ModelRuntime, settings: Settings) -> str:
    return f"model {runtime.name} is at its queue limit ({settings.max_queue_size})"


async def _until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so receive() waits for that alone)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _infer_unless_disconnected(request: Request, runtime: ModelRuntime, image, deadline,
                                     admission=None) -> InferenceResult:
    """The batcher's answer; if the client disconnects first, its request is cancelled (and skipped)."""
    inference = asyncio.ensure_future(runtime.batcher.infer(image, deadline, admission))
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({inference, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not inference.done():
            inference.cancel()
    if inference.cancelled():
        raise ClientDisconnected()
    return inference.result()


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
        if registry.draining and admission is None:  # one admitted before the drain is served
            raise HTTPException(503, "the service is shutting down", headers={"Retry-After": "1"})
        if not runtime.ready:
            raise HTTPException(503, f"model {runtime.name} is {runtime.state}", headers={"Retry-After": "5"})
        deadline = time.monotonic() + settings.request_timeout_s
        check_content_type(file.content_type)
        data = await file.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise ImageError(413, f"upload larger than {settings.max_upload_bytes} bytes")
        spec = runtime.bundle.input
        async with request.app.state.decode_slots:  # bounded: decoding is where memory goes
            decoded = await run_in_threadpool(decode_image, data, spec.size, spec.channels, settings.max_image_pixels)
        result = await _infer_unless_disconnected(request, runtime, decoded.array, deadline, admission)
        response = _answer(runtime, result, decoded.width, decoded.height, threshold)
        if map_format == "png":
            map_width, map_height = map_size(decoded.width, decoded.height, settings.max_map_pixels)
            async with request.app.state.decode_slots:
                response["anomaly_map"] = await run_in_threadpool(encode_map_png, result.anomaly_map, map_width,
                                                                  map_height)
            response["map_width"], response["map_height"] = map_width, map_height
        response["timings_ms"] = Timings(queue=round(result.queue_s * 1e3, 3),
                                         inference=round(result.inference_s * 1e3, 3),
                                         total=round((time.perf_counter() - started) * 1e3, 3))
        return InspectResponse(**response)
    except ImageError as e:
        raise HTTPException(e.status_code, e.detail) from None
    except QueueFullError as e:
        raise HTTPException(429, queue_full_detail(runtime, settings),
                            headers={"Retry-After": str(e.retry_after_s)}) from None
    except RequestTimeoutError:
        raise HTTPException(504, f"no answer within {settings.request_timeout_s:g} s") from None
    except InferenceError as e:
        raise HTTPException(500, str(e)) from None
    except BatcherClosedError:
        raise HTTPException(503, "the service is shutting down", headers={"Retry-After": "1"}) from None
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody is listening; the server drops it
    finally:
        metrics.request_duration.labels(runtime.name).observe(time.perf_counter() - started)


def _answer(runtime: ModelRuntime, result: InferenceResult, width: int, height: int,
            threshold: float | None) -> dict:
    bundle = runtime.bundle
    applied = threshold if threshold is not None else bundle.threshold
    return {
        "model": runtime.name,
        "image_score": result.score,
        "normalized_score": float(bundle.normalize_score(result.score)) if bundle.calibrated else None,
        "threshold": applied,
        "is_anomalous": None if applied is None else bool(result.score >= applied),
        "width": width,
        "height": height,
    }

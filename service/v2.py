"""The Open Inference Protocol (KServe v2, what Triton speaks over HTTP), so its clients call the service unchanged.

    GET  /v2/health/live, /v2/health/ready          200 when live / when at least one model is ready
    GET  /v2                                        server metadata
    GET  /v2/models/{name}[/versions/{v}]           model metadata: the graph's input and outputs
    GET  /v2/models/{name}[/versions/{v}]/ready     200 when that model serves
    POST /v2/models/{name}[/versions/{v}]/infer     uint8 NCHW images in; anomaly_map and score out

Tensors come as JSON (`data`, flat or nested, row-major) or in the binary extension (a JSON header of
`Inference-Header-Content-Length` bytes, then the raw tensors), and outputs go back binary when the request
asks for it (`binary_data_output`, or `binary_data` per output), as tritonclient does by default. Each image of
a request goes through the model's dynamic batcher like an /inspect upload, so v2 calls and /inspect calls are
batched together. The version is the bundle's (`Bundle.version`). Errors are `{"error": ...}`, the protocol's
shape. The batch is bounded by DIFFAD_MAX_FILES_PER_REQUEST, as /inspect/batch is.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..export.bundle import INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT, Bundle
from .batcher import wait_for_result
from .deps import MetricsDep, RegistryDep, SettingsDep, require_api_key
from .metrics import MODEL_STATE_KEY
from .models import ServedModel
from .routes import http_error_for

HEADER_LENGTH = "Inference-Header-Content-Length"
v2_public_router = APIRouter(prefix="/v2", tags=["open inference protocol"])
v2_router = APIRouter(prefix="/v2", tags=["open inference protocol"], dependencies=[Depends(require_api_key)])


class ProtocolError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@v2_public_router.get("/health/live", summary="the server is alive")
async def live() -> dict:
    return {"live": True}


@v2_public_router.get("/health/ready", summary="200 while at least one model serves")
async def ready(registry: RegistryDep) -> Response:
    status = registry.status(None)
    return JSONResponse({"ready": bool(status["ready"])}, status_code=200 if status["ready"] else 503)


@v2_router.get("", summary="server metadata")
async def server_metadata() -> dict:
    return {"name": "diffad", "version": __version__, "extensions": ["binary_tensor_data"]}


def _runtime(registry, name: str, version: str | None) -> ServedModel:
    runtime = registry.models.get(name)
    if runtime is None:
        raise ProtocolError(404, f"unknown model {name[:64]!r}; loaded: {', '.join(sorted(registry.models))}")
    if version is not None and version != runtime.bundle.version:
        raise ProtocolError(404, f"model {name} has version {runtime.bundle.version}, not {version[:64]!r}")
    return runtime


def _metadata(runtime: ServedModel) -> dict:
    spec = runtime.bundle.input
    return {"name": runtime.name, "versions": [runtime.bundle.version], "platform": "diffad_onnx",
            "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, spec.channels, spec.size, spec.size]}],
            "outputs": [{"name": MAP_OUTPUT, "datatype": "FP32", "shape": [-1, 1, spec.size, spec.size]},
                        {"name": SCORE_OUTPUT, "datatype": "FP32", "shape": [-1]}]}


@v2_router.get("/models/{name}", summary="model metadata")
@v2_router.get("/models/{name}/versions/{version}", summary="model metadata")
async def model_metadata(name: str, registry: RegistryDep, version: str | None = None) -> Response:
    try:
        return JSONResponse(_metadata(_runtime(registry, name, version)))
    except ProtocolError as e:
        return _error(e.status, e.message)


@v2_router.get("/models/{name}/ready", summary="200 when the model serves")
@v2_router.get("/models/{name}/versions/{version}/ready", summary="200 when the model serves")
async def model_ready(name: str, registry: RegistryDep, version: str | None = None) -> Response:
    try:
        runtime = _runtime(registry, name, version)
    except ProtocolError as e:
        return _error(e.status, e.message)
    ok = runtime.ready and not registry.draining
    return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)


@v2_router.post("/models/{name}/infer", summary="score a batch of images")
@v2_router.post("/models/{name}/versions/{version}/infer", summary="score a batch of images")
async def infer(name: str, request: Request, registry: RegistryDep, settings: SettingsDep, metrics: MetricsDep,
                header_length: Annotated[int | None, Header(alias=HEADER_LENGTH, ge=0)] = None,
                version: str | None = None) -> Response:
    started = time.perf_counter()
    runtime = None
    try:
        runtime = _runtime(registry, name, version)
        setattr(request.state, MODEL_STATE_KEY, runtime.name)
        if registry.draining or not runtime.ready:
            raise ProtocolError(503, f"model {name} is {'shutting down' if registry.draining else runtime.state}",
                                {"Retry-After": "1"})
        body = await request.body()
        header, binary = (body[:header_length], body[header_length:]) if header_length is not None else (body, b"")
        try:
            infer_request = json.loads(header)
        except ValueError as e:
            raise ProtocolError(400, f"the request header is not JSON: {e}") from None
        if not isinstance(infer_request, dict):
            raise ProtocolError(400, "the request must be a JSON object")
        images = _input_images(infer_request, binary, runtime, settings.max_files_per_request)
        bundle, maps, scores = await _run(runtime, images, settings, version)
        return _response(infer_request, runtime.name, bundle, maps, scores)
    except ProtocolError as e:
        return _error(e.status, e.message, e.headers)
    finally:
        if runtime is not None:
            metrics.request_duration.labels(runtime.name).observe(time.perf_counter() - started)


def _input_images(infer_request: dict, binary: bytes, runtime: ServedModel, max_images: int) -> np.ndarray:
    inputs = infer_request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(400, f"expected one input tensor, {INPUT_NAME!r}")
    tensor = inputs[0]
    spec = runtime.bundle.input
    if tensor.get("name") != INPUT_NAME:
        raise ProtocolError(400, f"unknown input {str(tensor.get('name'))[:64]!r}; the model's input is {INPUT_NAME!r}")
    if tensor.get("datatype") != "UINT8":
        raise ProtocolError(400, f"input {INPUT_NAME} must be UINT8 (0..255), got {str(tensor.get('datatype'))[:16]}")
    shape = tensor.get("shape")
    expected = [spec.channels, spec.size, spec.size]
    if (not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(d, int) for d in shape)
            or shape[1:] != expected or shape[0] < 1):
        raise ProtocolError(400, f"input {INPUT_NAME} must have shape [N, {', '.join(map(str, expected))}], "
                                 f"got {str(shape)[:64]}")
    if shape[0] > max_images:
        raise ProtocolError(413, f"{shape[0]} images; at most {max_images} per request (DIFFAD_MAX_FILES_PER_REQUEST)")
    count = int(np.prod(shape))
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count or len(binary) != size:
            raise ProtocolError(400, f"binary input of {len(binary)} bytes for binary_data_size {size} and shape "
                                     f"{shape} ({count} bytes)")
        array = np.frombuffer(binary, dtype=np.uint8)
    else:
        if binary:
            raise ProtocolError(400, "binary data after the header but no binary_data_size on the input")
        try:
            values = np.asarray(tensor.get("data"), dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise ProtocolError(400, f"input {INPUT_NAME} data must be integers 0..255") from None
        if values.size != count or (values.size and (values.min() < 0 or values.max() > 255)):
            raise ProtocolError(400, f"input {INPUT_NAME} needs {count} values in 0..255, got {values.size}")
        array = values.astype(np.uint8)
    return array.reshape(shape)


async def _run(runtime: ServedModel, images: np.ndarray, settings,
               version: str | None) -> tuple[Bundle, np.ndarray, np.ndarray]:
    """Every image through the model's batcher, each with its own place in the queue; all or an error. All
    are queued in one step of the event loop, so one version answers them all (a reload may switch
    versions while the request is read): the bundle returned, which must be the one asked for, if any."""
    deadline = time.monotonic() + settings.request_timeout_s
    bundle, batcher, queued = runtime.bundle, runtime.batcher, []
    try:
        if version is not None and version != bundle.version:
            raise ProtocolError(404, f"model {runtime.name} has version {bundle.version}, not {version[:64]!r}")
        for image in images:
            queued.append(batcher.submit(np.ascontiguousarray(image), deadline, batcher.admit()))
        results = await asyncio.gather(*(wait_for_result(future, deadline) for future in queued))
    except Exception as e:
        http = http_error_for(e, runtime, settings)  # the answers /inspect gives, in the protocol's shape
        if http is None:
            raise
        raise ProtocolError(http.status_code, http.detail, http.headers) from None
    finally:
        for future in queued:
            future.cancel()  # after a failure, what is still queued is skipped
    maps = np.stack([r.anomaly_map for r in results]).astype(np.float32)  # [N, 1, H, W]
    scores = np.array([r.score for r in results], dtype=np.float32)
    return bundle, maps, scores


def _response(infer_request: dict, model_name: str, bundle: Bundle, maps: np.ndarray, scores: np.ndarray) -> Response:
    tensors = {MAP_OUTPUT: maps, SCORE_OUTPUT: scores}
    binary_default = bool((infer_request.get("parameters") or {}).get("binary_data_output", False))
    wanted = infer_request.get("outputs")
    if wanted is None:
        wanted = [{"name": name} for name in tensors]
    if not isinstance(wanted, list) or not all(isinstance(w, dict) for w in wanted):
        raise ProtocolError(400, "outputs must be a list of objects")
    outputs, buffers = [], []
    for entry in wanted:
        name = entry.get("name")
        if name not in tensors:
            raise ProtocolError(400, f"unknown output {str(name)[:64]!r}; the model's are {MAP_OUTPUT}, {SCORE_OUTPUT}")
        array = tensors[name]
        out = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if (entry.get("parameters") or {}).get("binary_data", binary_default):
            raw = array.astype("<f4").tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            buffers.append(raw)
        else:
            out["data"] = array.reshape(-1).tolist()
        outputs.append(out)
    answer = {"model_name": model_name, "model_version": bundle.version, "outputs": outputs}
    if "id" in infer_request:
        answer["id"] = infer_request["id"]
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not buffers:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(buffers), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})

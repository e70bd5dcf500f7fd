"""Response bodies of the HTTP API (docs/DESIGN.md, section 3)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Timings(BaseModel):
    queue: float = Field(description="ms waiting in the model's queue for a batch")
    inference: float = Field(description="ms of backend time for the batch that held this image")
    total: float = Field(description="ms from upload received to answer built")


class InspectResponse(BaseModel):
    model: str
    model_version: str = Field(description="the bundle's version: the first 12 hex digits of its ONNX file's "
                               "SHA-256, as GET /models and the v2 metadata give it")
    image_score: float = Field(description="raw score: mean of the top-k anomaly-map values")
    normalized_score: float | None = Field(
        description="0..1 on the bundle's calibrated scale, 0.5 at its threshold; null if uncalibrated")
    threshold: float | None = Field(description="the threshold applied: the query's, else the bundle's")
    is_anomalous: bool | None = Field(description="image_score >= threshold; null without a threshold")
    anomaly_map: str | None = Field(
        None, description="base64 8-bit grayscale PNG (map x 255) at the image's own resolution; absent for "
        "map=none")
    map_width: int | None = Field(None, description="the map's size: the image's, unless it is over "
                                  "DIFFAD_MAX_MAP_PIXELS; absent for map=none")
    map_height: int | None = None
    width: int
    height: int
    timings_ms: Timings


class BatchItemError(BaseModel):
    status: int = Field(description="the HTTP status /inspect would have answered for this file alone")
    detail: str


class BatchItem(BaseModel):
    index: int = Field(description="the file's position in the request, from 0")
    filename: str | None
    result: InspectResponse | None = Field(None, description="as /inspect answers; absent on error")
    error: BatchItemError | None = Field(None, description="why this file has no result; absent on success")


class BatchInspectResponse(BaseModel):
    model: str
    results: list[BatchItem] = Field(description="one per file, in the order sent")


class ModelInfo(BaseModel):
    name: str
    version: str = Field(description="the first 12 hex digits of the bundle's ONNX SHA-256")
    input_size: int
    channels: int
    threshold: float | None
    calibrated: bool
    backend: str | None = Field(description="null while loading")
    max_batch_size: int | None
    state: str = Field(description="loading, ready, failed or stopped")
    method: str = Field("diffusionad", description="the bundle's method: diffusionad or decodiff")
    category: str | None = Field(None, description="the category this model scores (a DeCo-Diff bundle)")
    shares_runtime_with: list[str] = Field(
        default_factory=list, description="the models served by the same weights, backend and batcher (the other "
                                          "categories of a multi-category bundle): their requests batch together")


class ReloadResponse(BaseModel):
    model: str
    version: str = Field(description="the version serving now")
    previous_version: str
    reloaded: bool = Field(description="false when the folder held the version already serving")
    warmup_s: float | None = Field(None, description="load and warm-up time of the new version")


class ModelList(BaseModel):
    models: list[ModelInfo]


class Liveness(BaseModel):
    status: str = "alive"

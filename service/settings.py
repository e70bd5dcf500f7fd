"""Service settings: environment variables (prefix DIFFAD_), then a dotenv-style settings file, then defaults.

The settings file is `.env` in the working directory, or the file named by DIFFAD_SETTINGS_FILE (which
must then exist). `diffad serve` flags override both. Lists (DIFFAD_MODELS, DIFFAD_API_KEYS) are
comma-separated or a JSON list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SETTINGS_FILE_VARIABLE = "DIFFAD_SETTINGS_FILE"
DEFAULT_SETTINGS_FILE = ".env"

BackendChoice = Literal["auto", "onnxruntime", "tensorrt", "torch", "triton"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LogFormat = Literal["text", "json"]


def _split_list(value: Any) -> Any:
    """'a,b' or '["a", "b"]' -> ['a', 'b']; anything else is left to pydantic."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIFFAD_", env_file=DEFAULT_SETTINGS_FILE, extra="ignore",
                                      validate_default=True)

    models: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="model bundle folders to serve (comma-separated or JSON list)")
    backend: BackendChoice = Field(
        "auto", description="auto picks the fastest available: TensorRT engine > ONNX Runtime CUDA > PyTorch CUDA > "
        "ONNX Runtime CPU; "
        "triton sends batches to NVIDIA Triton Inference Server at DIFFAD_TRITON_URL (the gateway)")
    triton_url: str | None = Field(
        None, description="with DIFFAD_BACKEND=triton: http://HOST:8000 (HTTP) or grpc://HOST:8001 (gRPC)")
    triton_health_interval_s: float = Field(
        2.0, gt=0, le=300, description="with DIFFAD_BACKEND=triton: how often each model's readiness is asked of "
        "Triton; a model Triton does not serve turns unready here too")
    max_batch_size: int = Field(8, ge=1, le=1024, description="largest batch the dynamic batcher forms")
    max_queue_delay_ms: float = Field(
        5.0, ge=0, le=10_000, description="how long the oldest queued request may wait for a batch to fill")
    max_queue_size: int = Field(256, ge=1, description="requests queued per model before answering 429")
    request_timeout_s: float = Field(30.0, gt=0, description="a request not answered by then gets 504")
    max_upload_bytes: int = Field(20 * 2**20, ge=1, description="largest accepted upload (413 above)")
    max_files_per_request: int = Field(
        16, ge=1, le=256, description="most images in one POST /inspect/batch (413 above); each is held to "
        "DIFFAD_MAX_UPLOAD_BYTES")
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="largest accepted width x height, checked before decoding (413 above)")
    max_map_pixels: int = Field(
        16_000_000, ge=1, description="largest returned anomaly map (width x height): a larger image's map is "
        "scaled down, aspect kept, and its size given as map_width and map_height")
    unhealthy_after_failures: int = Field(
        3, ge=1, description="batches failing in a row after which a model turns unready and is opened again")
    max_concurrent_decodes: int = Field(
        2, ge=1, le=256, description="uploads decoded (and maps encoded) at once: with the image and map limits, "
        "what bounds the service's memory")
    drain_grace_s: float = Field(
        5.0, ge=0, le=600, description="after SIGTERM, how long the service keeps listening and answering 503 "
        "(readiness and new requests) before it closes its port, so load balancers see it leave")
    threads: int | None = Field(None, ge=1, description="intra-op threads of the backend (default: its own)")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="accepted X-API-Key values (comma-separated); empty: no auth")
    torch_precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="backend torch: the networks' precision (the rest of the pipeline stays fp32); auto: "
        "fp16 on a CUDA GPU, fp32 on the CPU")
    torch_cuda_graphs: bool = Field(
        True, description="backend torch on a GPU: replay each batch size's kernels as one CUDA graph (captured "
        "at warm-up for batches 1, 2, 4, ... up to the largest; a batch is padded to the next)")
    torch_compile: bool = Field(False, description="backend torch: torch.compile the model first (slower start)")
    cuda_device: int = Field(0, ge=0, description="the CUDA device (among those CUDA_VISIBLE_DEVICES shows) that "
                             "the torch and TensorRT backends use")
    engine_cache: Path | None = Field(
        None, description="folder of TensorRT engines built for this GPU by `diffad engines`")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: LogLevel = "info"
    log_format: LogFormat = Field(
        "text", description="text (a terminal) or json: one JSON object per line, request id and latencies as keys")

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_keys")
    @classmethod
    def _no_empty_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(not k.get_secret_value().strip() for k in keys):
            raise ValueError("API keys must not be empty strings")
        return keys

    @model_validator(mode="after")
    def _triton_needs_url(self) -> Settings:
        if self.backend == "triton" and not self.triton_url:
            raise ValueError("DIFFAD_BACKEND=triton needs DIFFAD_TRITON_URL (e.g. http://triton:8000)")
        return self

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment and the settings file; `overrides` (e.g. CLI flags) win over both.

    Overrides that are None are ignored, so a CLI flag that was not given does not mask the environment.
    """
    settings_file = os.environ.get(SETTINGS_FILE_VARIABLE)
    if settings_file and not Path(settings_file).is_file():
        raise ValueError(f"{SETTINGS_FILE_VARIABLE}={settings_file!r}: no such file")
    given = {k: v for k, v in overrides.items() if v is not None}
    return Settings(_env_file=settings_file or DEFAULT_SETTINGS_FILE, **given)

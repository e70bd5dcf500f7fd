"""Inference backends behind one interface: a uint8 NCHW batch in, (maps [B, 1, H, W], scores [B]) out.

    onnxruntime  the bundle's model.onnx; the CPU by default, CUDA when onnxruntime-gpu sees a GPU
    tensorrt     a native TensorRT engine built for this GPU: from the bundle's `engines` or from the
                 engine cache (DIFFAD_ENGINE_CACHE, filled by `diffad engines`)
    torch        PyTorch eager on the bundle's model.safetensors (development only: needs torch)

`backend=auto` takes the fastest that this machine can run: a TensorRT engine for this GPU, else
ONNX Runtime on CUDA, else ONNX Runtime on the CPU, and logs why. Each backend is opened and called on
its model's own worker thread (one at a time), so none needs to be thread-safe. Nothing here imports
torch or tensorrt at module level: the serving image carries neither unless asked to.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..export.bundle import INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT, WEIGHTS_FILE, Bundle
from .settings import Settings

log = logging.getLogger("diffad.service")


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here; the message says what is missing and what to do."""


class Backend(ABC):
    """Runs one model on batches. `max_batch_size` is the most it takes in one call (None: any)."""

    name: str = "backend"
    max_batch_size: int | None = None
    device: str = "cpu"
    precision: str = "fp32"
    fallback: str | None = None  # why backend=auto did not get the faster backend it tried first

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self._float_input = bundle.input.dtype == "float32"

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images: uint8 [B, C, H, W] at the model's size -> (float32 maps [B, 1, H, W], float32 scores [B])."""
        if self._float_input:  # a float32-input graph takes 0..1; the uint8 graph divides by 255 itself
            images = images.astype(np.float32) / np.float32(255.0)
        maps, scores = self.run(images)
        return np.asarray(maps, dtype=np.float32), np.asarray(scores, dtype=np.float32).reshape(-1)

    @abstractmethod
    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The graph's own input dtype in, (maps, scores) out."""

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to free
        """Free what the backend holds (device memory, sessions)."""

    def describe(self) -> str:
        return self.name


# --- ONNX Runtime ----------------------------------------------------------------------------------
def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


class OnnxRuntimeBackend(Backend):
    def __init__(self, bundle: Bundle, threads: int | None = None, use_cuda: bool | None = None):
        super().__init__(bundle)
        import onnxruntime as ort

        available = ort.get_available_providers()
        if use_cuda is None:
            use_cuda = "CUDAExecutionProvider" in available
        if use_cuda and "CUDAExecutionProvider" not in available:
            raise BackendUnavailable("ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one graph call at a time per model: parallelism is within ops
        self.session = ort.InferenceSession(str(bundle.onnx_path), options, providers=providers)
        used = self.session.get_providers()
        self.name = "onnxruntime-cuda" if "CUDAExecutionProvider" in used else "onnxruntime-cpu"
        self.device = "cuda" if "CUDAExecutionProvider" in used else "cpu"
        self.threads = threads

    def run(self, images):
        maps, scores = self.session.run([MAP_OUTPUT, SCORE_OUTPUT], {INPUT_NAME: images})
        return maps, scores

    def describe(self) -> str:
        return f"{self.name} (threads {self.threads or 'default'})"


# --- TensorRT --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineChoice:
    folder: str      # where the engine file lies: the bundle or the engine cache
    record: dict     # the bundle's `engines` entry or the cache sidecar
    source: str      # "bundle" or "cache"


def find_engine(bundle: Bundle, engine_cache) -> tuple[EngineChoice | None, str]:
    """An engine for this GPU and TensorRT version, from the bundle or the cache; else None and why."""
    from ..export import tensorrt_engine as te

    missing = te.missing_for_tensorrt()
    if missing:
        return None, "this machine lacks " + te.join_words(missing)
    gpu, version = te.detect_gpu(), te.tensorrt_version()
    entry = te.select_engine(bundle.engines, gpu.name, version)
    if entry is not None:
        return EngineChoice(str(bundle.path), entry, "bundle"), f"the bundle has an engine for {gpu.name}"
    if engine_cache is None:
        return None, (f"the bundle has no engine for {gpu.name} with TensorRT {version} and no engine cache is "
                      "set (DIFFAD_ENGINE_CACHE; fill it with `diffad engines`)")
    cached, passed_over = te.find_cached_engine(engine_cache, te.bundle_onnx_sha256(bundle), gpu.name, version)
    for reason in passed_over:
        log.info("model %s: %s", bundle.name, reason)
    if cached is None:
        return None, (f"neither the bundle nor the engine cache {engine_cache} has an engine for this model on "
                      f"{gpu.name} with TensorRT {version} (build one with `diffad engines`)")
    return EngineChoice(str(cached.path.parent), cached.record, "cache"), f"the engine cache has one for {gpu.name}"


class TensorRTBackend(Backend):
    def __init__(self, bundle: Bundle, choice: EngineChoice):
        super().__init__(bundle)
        from ..export.tensorrt_engine import EngineRunner, load_engine

        self.record = choice.record
        self.runner = EngineRunner(load_engine(choice.folder, choice.record))  # refuses foreign engines
        self.min_batch_size = int(choice.record.get("min_batch", 1))
        self.max_batch_size = int(choice.record["max_batch"])
        self.name = f"tensorrt-{choice.record['precision']}"
        self.device, self.precision = "cuda", str(choice.record["precision"])
        self.source = choice.source

    def run(self, images):
        count = len(images)
        if count < self.min_batch_size:  # below the profile: pad with copies, drop their results
            images = np.concatenate([images, np.repeat(images[-1:], self.min_batch_size - count, axis=0)])
        maps, scores = self.runner(images)
        return maps[:count], scores[:count]

    def close(self) -> None:
        self.runner.close()

    def describe(self) -> str:
        return (f"{self.name} ({self.record['file']} from the {self.source}, batch "
                f"{self.min_batch_size}..{self.max_batch_size})")


# --- PyTorch (development) -------------------------------------------------------------------------
class TorchBackend(Backend):
    def __init__(self, bundle: Bundle, threads: int | None = None):
        super().__init__(bundle)
        try:
            import torch

            from ..models.checkpoint import load_model
        except ImportError as e:
            raise BackendUnavailable(f"the torch backend needs PyTorch ({e}); install diffad[train] or use "
                                     "onnxruntime") from e
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(bundle.path / WEIGHTS_FILE).to(self.device).eval()
        self.name = f"torch-{self.device}"  # self.device: the Backend's field too
        self._float_input = False  # the model takes 0..1 floats: converted below from uint8

    def run(self, images):
        torch = self.torch
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).float() / 255.0
            maps, scores = self.model(batch)
        return maps.float().cpu().numpy(), scores.float().cpu().numpy()


# --- choosing --------------------------------------------------------------------------------------
BackendFactory = Callable[[Bundle, Settings], Backend]


def open_backend(bundle: Bundle, settings: Settings) -> Backend:
    """The backend settings.backend names for this bundle; for auto, the fastest that runs here."""
    choice = settings.backend
    if choice == "onnxruntime":
        return OnnxRuntimeBackend(bundle, settings.threads)
    if choice == "torch":
        return TorchBackend(bundle, settings.threads)
    if choice == "tensorrt":
        engine, why = find_engine(bundle, settings.engine_cache)
        if engine is None:
            raise BackendUnavailable(f"backend tensorrt for model {bundle.name}: {why}")
        return TensorRTBackend(bundle, engine)

    engine, why = find_engine(bundle, settings.engine_cache)
    fallback = None
    if engine is not None:
        try:
            backend = TensorRTBackend(bundle, engine)
        except Exception as e:  # a broken engine should not keep the model from serving, but must be seen
            why = f"the TensorRT engine {engine.record.get('file')} failed to load: {type(e).__name__}: {e}"
            log.error("model %s: FALLBACK: %s; serving it with ONNX Runtime instead (diffad_backend_info says "
                      "fallback=\"true\"; rebuild the engine with `diffad engines`)", bundle.name, why)
            fallback = why
        else:
            log.info("model %s: backend auto chose %s: %s", bundle.name, backend.describe(), why)
            return backend
    backend = OnnxRuntimeBackend(bundle, settings.threads)
    backend.fallback = fallback
    reason = ("ONNX Runtime's CUDA provider is available" if backend.name == "onnxruntime-cuda"
              else "ONNX Runtime has no CUDA provider here (onnxruntime-gpu not installed or no GPU)")
    log.info("model %s: backend auto chose %s: no TensorRT engine (%s); %s", bundle.name, backend.describe(),
             why, reason)
    return backend

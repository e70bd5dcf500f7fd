"""Inference backends behind one interface: a uint8 NCHW batch in, (maps [B, 1, H, W], scores [B]) out.
A multi-category bundle's shared graph also takes each image's category index (int64 [B]); the onnxruntime
and torch backends feed it, and the others refuse such a bundle when opened.

    onnxruntime  the bundle's model.onnx; the CPU by default, CUDA when onnxruntime-gpu sees a GPU
    tensorrt     a native TensorRT engine built for this GPU: from the bundle's `engines` or from the
                 engine cache (DIFFAD_ENGINE_CACHE, filled by `diffad engines`)
    torch        PyTorch on the bundle's model.safetensors: fp32 eager on the CPU (development); on a CUDA GPU
                 fp16 networks, channels-last, CUDA graphs per batch bucket (a GPU host without TensorRT)
    triton       the gateway: each batch goes to NVIDIA Triton Inference Server (DIFFAD_TRITON_URL), which
                 runs the model; this service keeps decoding, limits, thresholds and map encoding

`backend=auto` takes the fastest that this machine can run: a TensorRT engine for this GPU, else
ONNX Runtime on CUDA, else PyTorch on CUDA (where torch sees a GPU), else ONNX Runtime on the CPU, and
logs why. Each backend is opened and called on
its model's own worker thread (one at a time), so none needs to be thread-safe. Nothing here imports
torch or tensorrt at module level: the serving image carries neither unless asked to.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..export.bundle import CATEGORY_INPUT, INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT, WEIGHTS_FILE, Bundle
from .batcher import UpstreamError
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
        self.takes_categories = bundle.category_input is not None  # a multi-category bundle's shared graph

    def __call__(self, images: np.ndarray, categories: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """images: uint8 [B, C, H, W] at the model's size (and, for a multi-category bundle, each image's
        category index, int64 [B]) -> (float32 maps [B, 1, H, W], float32 scores [B])."""
        if self._float_input:  # a float32-input graph takes 0..1; the uint8 graph divides by 255 itself
            images = images.astype(np.float32) / np.float32(255.0)
        if self.takes_categories:
            if categories is None or len(categories) != len(images):
                raise ValueError(f"model {self.bundle.name} takes each image's category: give one index per image")
            maps, scores = self.run(images, np.ascontiguousarray(categories, dtype=np.int64))
        else:
            maps, scores = self.run(images)
        return np.asarray(maps, dtype=np.float32), np.asarray(scores, dtype=np.float32).reshape(-1)

    @abstractmethod
    def run(self, images: np.ndarray, categories: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The graph's own input dtype in (with the category indices where the graph takes them), (maps,
        scores) out."""

    def refuse_categories(self) -> None:
        """For backends that feed the images alone: a shared multi-category graph cannot run on them."""
        if self.takes_categories:
            raise BackendUnavailable(f"model {self.bundle.name} is one category of a multi-category bundle whose "
                                     f"graph takes the category as an input: the {self.name} backend does not "
                                     "feed it; serve it with DIFFAD_BACKEND=onnxruntime or torch")

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to free
        """Free what the backend holds (device memory, sessions)."""

    def describe(self) -> str:
        return self.name

    def prepare(self, max_batch_size: int) -> None:  # noqa: B027 - most backends need nothing before warm-up
        """Get ready for batches up to max_batch_size (capture CUDA graphs); called before the warm-up."""

    def check(self) -> str | None:
        """None while the backend can serve; else why not. Only remote backends can turn unable between
        batches (the registry asks them every DIFFAD_TRITON_HEALTH_INTERVAL_S)."""
        return None


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

    def run(self, images, categories=None):
        feed = {INPUT_NAME: images} if categories is None else {INPUT_NAME: images, CATEGORY_INPUT: categories}
        maps, scores = self.session.run([MAP_OUTPUT, SCORE_OUTPUT], feed)
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
    name = "tensorrt"

    def __init__(self, bundle: Bundle, choice: EngineChoice):
        super().__init__(bundle)
        self.refuse_categories()
        from ..export.tensorrt_engine import EngineRunner, load_engine

        self.record = choice.record
        self.runner = EngineRunner(load_engine(choice.folder, choice.record))  # refuses foreign engines
        self.min_batch_size = int(choice.record.get("min_batch", 1))
        self.max_batch_size = int(choice.record["max_batch"])
        self.name = f"tensorrt-{choice.record['precision']}"
        self.device, self.precision = "cuda", str(choice.record["precision"])
        self.source = choice.source

    def run(self, images, categories=None):
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


# --- PyTorch: the CPU for development, a CUDA GPU without TensorRT --------------------------------
def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes that get a CUDA graph: 1, 2, 4, ... below the largest, and the largest itself.

    A graph replays fixed shapes, so a batch is padded up to the next bucket: at most half of a replay
    is padding, for log2(max) graphs instead of one per size (they share one memory pool)."""
    if max_batch_size < 1:
        raise ValueError(f"max batch size must be positive, got {max_batch_size}")
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return [*buckets, max_batch_size]


class BatchGraphs:
    """One replayable graph per bucket, made by capture(bucket) (a function images -> outputs) on first use
    or by capture_all; a batch runs padded (copies of its last image) in its bucket's graph, results cut back.

    capture is injected so that this logic is tested without a GPU (tests/test_service_ops.py)."""

    def __init__(self, capture: Callable[[int], Callable], max_batch_size: int):
        self.capture, self.buckets = capture, batch_buckets(max_batch_size)
        self.graphs: dict[int, Callable] = {}

    def bucket(self, count: int) -> int:
        for size in self.buckets:
            if count <= size:
                return size
        raise ValueError(f"a batch of {count} is larger than the largest captured ({self.buckets[-1]})")

    def capture_all(self) -> None:
        for size in sorted(self.buckets, reverse=True):  # largest first: the smaller reuse its memory pool
            self._graph(size)

    def _graph(self, size: int) -> Callable:
        if size not in self.graphs:
            self.graphs[size] = self.capture(size)
        return self.graphs[size]

    def __call__(self, images, categories=None):
        """categories: for a multi-category model, each image's index (padded alike, passed on)."""
        count = len(images)
        size = self.bucket(count)
        if size > count:
            padded = list(range(count)) + [count - 1] * (size - count)
            images = images[padded]
            categories = None if categories is None else categories[padded]
        graph = self._graph(size)
        outputs = graph(images) if categories is None else graph(images, categories)
        return tuple(out[:count] for out in outputs)


TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_precision(choice: str, device: str, native_bf16_cpu: bool) -> str:
    """auto: fp16 on a GPU (tensor cores), fp32 on the CPU; bf16 on a CPU only where it computes bf16 natively
    (emulated bf16 is 25-85x slower); fp16 on a CPU is refused (PyTorch's CPU fp16 kernels are slow)."""
    if choice == "auto":
        return "fp16" if device == "cuda" else "fp32"
    if device == "cpu" and choice == "fp16":
        raise BackendUnavailable("DIFFAD_TORCH_PRECISION=fp16 needs a CUDA GPU; on the CPU use fp32 (or bf16 "
                                 "where the CPU has AVX512-BF16 or AMX)")
    if device == "cpu" and choice == "bf16" and not native_bf16_cpu:
        raise BackendUnavailable("DIFFAD_TORCH_PRECISION=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), "
                                 "where bf16 is emulated and many times slower than fp32; use fp32")
    return choice


class TorchBackend(Backend):
    """The bundle's model.safetensors in PyTorch. On a CUDA GPU: the networks in fp16 (or bf16; the rest of
    the pipeline in fp32, as in model.fp16.onnx), channels-last convolutions, one CUDA graph per batch
    bucket captured at warm-up (prepare), optionally torch.compile first. On the CPU: fp32 eager."""

    def __init__(self, bundle: Bundle, threads: int | None = None, precision: str = "auto",
                 cuda_graphs: bool = True, compile: bool = False, cuda_device: int = 0):
        super().__init__(bundle)
        try:
            import torch

            from ..hardware import convolution_layout, cpu_computes_bf16
            from ..models.checkpoint import load_model
        except ImportError as e:
            raise BackendUnavailable(f"the torch backend needs PyTorch ({e}); install diffad[train] or use "
                                     "onnxruntime") from e
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        cuda = torch.cuda.is_available()
        if cuda:
            if cuda_device >= torch.cuda.device_count():
                raise BackendUnavailable(f"DIFFAD_CUDA_DEVICE={cuda_device}, but CUDA shows "
                                         f"{torch.cuda.device_count()} device(s)")
            self.device = f"cuda:{cuda_device}"
        else:
            self.device = "cpu"
        kind = self.device.split(":")[0]
        native_bf16 = kind == "cpu" and cpu_computes_bf16()
        self.precision = torch_precision(precision, kind, native_bf16)
        model = load_model(bundle.path / WEIGHTS_FILE).to(self.device).eval()
        # a one-category bundle, or one category of an older bundle's graph per category; a shared
        # multi-category graph gets each image's category with its batch instead
        if bundle.category is not None and not self.takes_categories:
            model.set_category(bundle.category)
        model.set_network_dtype(getattr(torch, TORCH_DTYPES[self.precision]))
        # NHWC where it is faster: what tensor-core convolutions read, and oneDNN's faster layout for fp32 on the
        # CPU (the small preset at batch 8 on a 2-core Xeon: 93 against 117 ms per image); NCHW for bf16 there
        nhwc = convolution_layout(kind, self.precision) == "channels_last"
        self.memory_format = torch.channels_last if nhwc else torch.contiguous_format
        model = model.to(memory_format=self.memory_format)
        self.model = model
        self.forward = torch.compile(model, dynamic=False) if compile else model
        self.compiled = compile
        self.use_graphs = kind == "cuda" and cuda_graphs
        self.graphs: BatchGraphs | None = None  # made by prepare(), which knows the largest batch
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None  # shared by every bucket
        self.name = f"torch-{kind}"
        self._float_input = False  # the model takes 0..1 floats: converted below from uint8

    def prepare(self, max_batch_size: int) -> None:
        if self.use_graphs:
            self.graphs = BatchGraphs(self._capture, max_batch_size)
            self.graphs.capture_all()

    def _to_model(self, images):
        batch = self.torch.as_tensor(images, device=self.device).float() / 255.0
        return batch.contiguous(memory_format=self.memory_format)

    def _capture(self, size: int):
        """A CUDA graph of the whole pipeline for batches of `size` uint8 images on the device."""
        torch = self.torch
        static_in = torch.zeros((size, self.bundle.input.channels, self.bundle.input.size, self.bundle.input.size),
                                dtype=torch.uint8, device=self.device)
        # a multi-category model: the images' category indices are a captured input too
        static_classes = torch.zeros(size, dtype=torch.int64, device=self.device) if self.takes_categories else None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(3):  # outside the capture: cuDNN and compile choose their kernels here
                self._forward(self._to_model(static_in), static_classes)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._graph_pool):
            static_out = self._forward(self._to_model(static_in), static_classes)

        def replay(images, classes=None):
            static_in.copy_(images)
            if static_classes is not None:
                static_classes.copy_(classes)
            graph.replay()
            return static_out

        return replay

    def _forward(self, batch, classes=None):
        return self.forward(batch) if classes is None else self.forward(batch, classes)

    def run(self, images, categories=None):
        torch = self.torch
        classes = None if categories is None else torch.from_numpy(categories).to(self.device)
        with torch.inference_mode():
            if self.graphs is not None:
                maps, scores = self.graphs(torch.from_numpy(np.ascontiguousarray(images)).to(self.device), classes)
            else:
                maps, scores = self._forward(self._to_model(np.ascontiguousarray(images)), classes)
            # copied out before the next replay overwrites the graph's outputs
            return maps.float().cpu().numpy(), scores.float().cpu().numpy()

    def describe(self) -> str:
        graphs = f", CUDA graphs for batches {self.graphs.buckets}" if self.graphs is not None else ""
        return f"{self.name} ({self.precision}{', compiled' if self.compiled else ''}{graphs})"


# --- NVIDIA Triton Inference Server (the gateway) --------------------------------------------------
def parse_triton_url(url: str) -> tuple[str, str]:
    """'http://triton:8000' -> ('http', 'triton:8000'); 'grpc://triton:8001' -> ('grpc', ...); no scheme: http."""
    scheme, sep, address = url.partition("://")
    if not sep:
        scheme, address = "http", url
    scheme, address = scheme.lower(), address.rstrip("/")
    if scheme not in ("http", "grpc") or not address or "/" in address:
        raise BackendUnavailable(f"DIFFAD_TRITON_URL={url!r}: give http://HOST:PORT (Triton's HTTP port, 8000) or "
                                 "grpc://HOST:PORT (its gRPC port, 8001)")
    return scheme, address


# Triton's answers that mean "not now" rather than "broken": the gateway passes them on as its own.
_QUEUE_FULL = ("exceeds maximum queue size",)
_TRITON_TIMEOUT = ("request timeout expired", "timeout", "deadline")
_NOT_SERVING = ("unknown model", "not ready", "unavailable", "is not found", "failed to connect", "connection")


class TritonBackend(Backend):
    """Sends each batch to Triton as one request (binary tensors) and waits for the map and score.

    A bundle read from a Triton repository's version folder (REPO/<name>/<n>/, as `diffad export-triton`
    writes) pins requests to version n, so the thresholds applied here are always those of the weights that
    ran; a bundle from elsewhere must match the version Triton serves (its diffad_bundle_version
    parameter). The client is made and used on the model's own thread only: tritonclient's HTTP client is
    not thread-safe.
    """

    name = "triton"

    def __init__(self, bundle: Bundle, url: str, timeout_s: float):
        super().__init__(bundle)
        self.refuse_categories()
        self.protocol, self.address = parse_triton_url(url)
        try:
            if self.protocol == "grpc":
                import tritonclient.grpc as client
            else:
                import tritonclient.http as client
            from tritonclient.utils import InferenceServerException
        except ImportError as e:
            raise BackendUnavailable(f"the triton backend needs tritonclient ({e}): install diffad[triton]") from e
        self._client_module, self._server_error = client, InferenceServerException
        self.timeout_s = timeout_s
        self.url = f"{self.protocol}://{self.address}"
        self.model_name = bundle.name
        folder = bundle.path.name
        self.model_version = folder if folder.isdigit() and (bundle.path.parent / "config.pbtxt").is_file() else ""
        if self.protocol == "grpc":
            self.client = client.InferenceServerClient(self.address)
        else:
            self.client = client.InferenceServerClient(self.address, connection_timeout=min(timeout_s, 10.0),
                                                       network_timeout=timeout_s)
        self.name, self.device = f"triton-{self.protocol}", "remote"
        try:
            self._check_model()
        except Exception:
            self.close()
            raise
        self._input_type = "UINT8" if bundle.input.dtype == "uint8" else "FP32"  # the graph's own, as exported

    def _which(self) -> str:
        return f"model {self.model_name}" + (f" version {self.model_version}" if self.model_version else "")

    def _check_model(self) -> None:
        """Triton serves this model, ready, with the bundle's interface; else BackendUnavailable saying why."""
        why = self.check()
        if why:
            raise BackendUnavailable(why)
        config = self.client.get_model_config(self.model_name, self.model_version,
                                              **({"as_json": True} if self.protocol == "grpc" else {}))
        config = config.get("config", config)  # gRPC's JSON wraps it
        problems = interface_problems(self.bundle, config)
        if not self.model_version:
            served = (config.get("parameters") or {}).get("diffad_bundle_version", {}).get("string_value")
            if served != self.bundle.version:
                problems.append(f"Triton's newest version is bundle version {served!r}, this bundle is "
                                f"{self.bundle.version!r}: serve the bundle from the Triton repository's version "
                                "folder (REPO/NAME/N) so that the two match")
        if problems:
            raise BackendUnavailable(f"Triton's {self._which()} does not match the bundle {self.bundle.path}: "
                                     + "; ".join(problems))
        limit = int(config.get("max_batch_size", 0))
        self.max_batch_size = limit or None
        self.precision = "tensorrt" if config.get("platform") == "tensorrt_plan" else str(
            config.get("backend") or config.get("platform") or "unknown")

    def run(self, images, categories=None):
        client = self._client_module
        http = self.protocol == "http"
        binary = {"binary_data": True} if http else {}  # HTTP's binary tensor extension; gRPC is binary anyway
        batch = client.InferInput(INPUT_NAME, list(images.shape), self._input_type)
        batch.set_data_from_numpy(np.ascontiguousarray(images), **binary)
        outputs = [client.InferRequestedOutput(name, **binary) for name in (MAP_OUTPUT, SCORE_OUTPUT)]
        call = {} if http else {"client_timeout": self.timeout_s}  # HTTP's is the client's network_timeout
        try:
            result = self.client.infer(self.model_name, [batch], model_version=self.model_version,
                                       outputs=outputs, **call)
        except self._server_error as e:
            raise self.upstream_error(e) from None
        except Exception as e:  # the connection: refused, reset, timed out (gevent and grpc raise their own)
            if "timeout" in type(e).__name__.lower() or "timed out" in str(e).lower():
                raise UpstreamError(504, f"Triton at {self.url} did not answer within {self.timeout_s:g} s") from None
            raise UpstreamError(503, f"Triton at {self.url} is unreachable: {type(e).__name__}", retry_after_s=1,
                                backend_ok=False) from None
        return result.as_numpy(MAP_OUTPUT), result.as_numpy(SCORE_OUTPUT).reshape(-1)

    def upstream_error(self, error) -> Exception:
        """Triton's error as the service's: queue full 429, its timeout 504, not serving 503, else a failure."""
        text = error.message() or str(error)
        lower, status = text.lower(), str(error.status() or "").upper()
        if any(words in lower for words in _QUEUE_FULL):
            return UpstreamError(429, f"Triton's queue for {self.model_name} is full; retry in 1 s", retry_after_s=1)
        if "DEADLINE_EXCEEDED" in status or any(words in lower for words in _TRITON_TIMEOUT):
            return UpstreamError(504, f"Triton did not answer within {self.timeout_s:g} s")
        if status in ("503", "STATUSCODE.UNAVAILABLE") or any(words in lower for words in _NOT_SERVING):
            return UpstreamError(503, f"Triton at {self.url} cannot serve {self._which()} now", retry_after_s=1,
                                 backend_ok=False)
        return RuntimeError(f"Triton answered {status or 'an error'}: {text[:300]}")

    def check(self) -> str | None:
        try:
            if self.client.is_model_ready(self.model_name, self.model_version):
                return None
        except Exception as e:
            return f"Triton at {self.url} is unreachable: {type(e).__name__}: {str(e)[:200]}"
        return (f"Triton at {self.url} does not serve {self._which()} (not loaded or not ready yet): add it to "
                "the model repository with `diffad export-triton`")

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a client whose server went away must not hide anything else
            log.debug("closing the Triton client failed", exc_info=True)

    def describe(self) -> str:
        return f"{self.name} ({self.url}, {self._which()}, max batch {self.max_batch_size or 'any'})"


def interface_problems(bundle: Bundle, config: dict) -> list[str]:
    """How a Triton model config (as JSON) differs from the bundle's graph interface; empty if it fits."""
    spec, size = bundle.input, bundle.input.size
    dtype = "TYPE_UINT8" if spec.dtype == "uint8" else "TYPE_FP32"
    want_inputs = {INPUT_NAME: (dtype, [spec.channels, size, size])}
    want_outputs = {MAP_OUTPUT: ("TYPE_FP32", [1, size, size]), SCORE_OUTPUT: ("TYPE_FP32", [1])}
    problems = []
    if int(config.get("max_batch_size", 0)) < 1:
        problems.append("its max_batch_size is 0: the gateway sends batches")
    for kind, want in (("input", want_inputs), ("output", want_outputs)):
        have = {t.get("name"): (t.get("data_type"), [int(d) for d in t.get("dims", [])])
                for t in config.get(kind, [])}
        for name, (want_type, want_dims) in want.items():
            if name not in have:
                problems.append(f"it has no {kind} {name!r}")
            elif have[name] != (want_type, want_dims):
                problems.append(f"its {kind} {name!r} is {have[name][0]} {have[name][1]}, the bundle's is "
                                f"{want_type} {want_dims}")
    return problems


def open_torch(bundle: Bundle, settings: Settings) -> TorchBackend:
    return TorchBackend(bundle, settings.threads, settings.torch_precision, settings.torch_cuda_graphs,
                        settings.torch_compile, settings.cuda_device)


def torch_sees_a_gpu() -> bool:
    """torch is installed and sees a CUDA GPU. torch is imported only where a GPU is there at all (asked of
    the CUDA runtime or nvidia-smi first), so a CPU host's serving process never loads it."""
    import importlib.util

    from ..export.tensorrt_engine import detect_gpu

    if importlib.util.find_spec("torch") is None or detect_gpu() is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


# --- choosing --------------------------------------------------------------------------------------
BackendFactory = Callable[[Bundle, Settings], Backend]


def open_backend(bundle: Bundle, settings: Settings) -> Backend:
    """The backend settings.backend names for this bundle; for auto, the fastest that runs here."""
    choice = settings.backend
    if choice == "onnxruntime":
        return OnnxRuntimeBackend(bundle, settings.threads)
    if choice == "torch":
        return open_torch(bundle, settings)
    if choice == "triton":
        return TritonBackend(bundle, settings.triton_url, settings.request_timeout_s)
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
    if "CUDAExecutionProvider" not in onnxruntime_providers() and torch_sees_a_gpu():
        backend = open_torch(bundle, settings)
        backend.fallback = fallback
        log.info("model %s: backend auto chose %s: no TensorRT engine (%s) and no ONNX Runtime CUDA provider, "
                 "but PyTorch sees a CUDA GPU", bundle.name, backend.describe(), why)
        return backend
    backend = OnnxRuntimeBackend(bundle, settings.threads)
    backend.fallback = fallback
    reason = ("ONNX Runtime's CUDA provider is available" if backend.name == "onnxruntime-cuda"
              else "ONNX Runtime has no CUDA provider here (onnxruntime-gpu not installed or no GPU)")
    log.info("model %s: backend auto chose %s: no TensorRT engine (%s); %s", bundle.name, backend.describe(),
             why, reason)
    return backend

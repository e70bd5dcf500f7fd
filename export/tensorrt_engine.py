"""TensorRT engines for a bundle: built from its model.onnx, on the GPU they are meant for.

A serialised engine runs only on the GPU model and with the TensorRT version it was built with, so each
is named after both, model.<gpu-slug>.trt<version>.<fp16|fp32>.engine, and recorded in bundle.json
(GPU name, compute capability, TensorRT version, precision, batch profile, parity figures). Loading
checks the record against this machine before TensorRT sees the file, so a foreign engine is refused
with a message naming both GPUs and both versions rather than a deserialisation error.

`tensorrt` and cuda-python (for device memory) are imported inside the functions that need them: this
module imports on any machine, and the serving path needs no torch. The GPU is found through the CUDA
runtime (the device TensorRT builds on) or, without cuda-python, `nvidia-smi`.

fp32 engines are built with TF32 disabled, so "fp32" means what it says and is held to 1e-3 / 1e-4
against ONNX Runtime; fp16 engines to 1e-2 (maps) and 5e-3 (scores): see parity.TENSORRT_TOLERANCES.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .bundle import INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT, Bundle, BundleError, load_bundle, seal_bundle, sha256_file
from .parity import TENSORRT_TOLERANCES, compare, log_report, onnxruntime_runner, parity_images, run_in_batches

log = logging.getLogger("diffad.export")


class TensorRTUnavailable(RuntimeError):
    """This machine cannot build or run engines (no tensorrt package, no cuda-python or no GPU)."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the graph or build the engine, or the engine failed its parity check."""


class EngineMismatchError(BundleError):
    """An engine built for another GPU or another TensorRT version."""


@dataclass(frozen=True)
class EngineOptions:
    """The batch profile and precision of an engine; checked when made."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    fp16: bool = False
    timing_cache: Path | None = None   # None: a per-GPU, per-version file under the user's cache folder
    workspace_mib: int = 2048          # TensorRT's workspace memory pool limit
    device: int | None = None          # the CUDA device index to build on (None: device 0)

    def __post_init__(self):
        for name in ("min_batch", "opt_batch", "max_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need --min-batch <= --opt-batch <= --max-batch, got "
                             f"{self.min_batch}, {self.opt_batch}, {self.max_batch}")
        if not isinstance(self.workspace_mib, int) or isinstance(self.workspace_mib, bool) or self.workspace_mib < 1:
            raise ValueError(f"--workspace-mib must be a positive integer, got {self.workspace_mib!r}")
        if self.device is not None and (not isinstance(self.device, int) or self.device < 0):
            raise ValueError(f"--device must be a CUDA device index (0, 1, ...), got {self.device!r}")

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    @classmethod
    def from_partial(cls, min_batch: int | None = None, opt_batch: int | None = None,
                     max_batch: int | None = None, **others) -> EngineOptions:
        """Options from what a user gave; an opt batch not given follows the bounds given (8 if it fits)."""
        lo = cls.min_batch if min_batch is None else min_batch
        hi = cls.max_batch if max_batch is None else max_batch
        opt = min(max(cls.opt_batch, lo), hi) if opt_batch is None else opt_batch
        return cls(min_batch=lo, opt_batch=opt, max_batch=hi, **others)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str | None   # "9.0"; None when the driver cannot say


# --- names and compatibility (pure) --------------------------------------------------------------
def gpu_slug(gpu_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': lowercase, runs of other characters -> '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    if not slug:
        raise ValueError(f"GPU name {gpu_name!r} has no letters or digits")
    return slug


def engine_filename(gpu_name: str, trt_version: str, precision: str) -> str:
    """model.<gpu-slug>.trt<version>.<precision>.engine, e.g. model.nvidia-a100-sxm4-40gb.trt10.3.0.fp16.engine."""
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", trt_version):
        raise ValueError(f"TensorRT version must look like 10.3.0, got {trt_version!r}")
    return f"model.{gpu_slug(gpu_name)}.trt{trt_version}.{precision}.engine"


REBUILD_IN_BUNDLE = ("Build one on this machine with `diffad export RUN_DIR --out BUNDLE_DIR --tensorrt`, or serve "
                     "the bundle with ONNX Runtime")


def check_engine_compatible(engine_entry: dict, gpu_name: str, trt_version: str,
                            remedy: str = REBUILD_IN_BUNDLE) -> None:
    """Refuse an engine (a bundle.json `engines` entry) built for another GPU or TensorRT version."""
    built_gpu, built_trt = engine_entry["gpu"], engine_entry["tensorrt_version"]
    problems = []
    if gpu_slug(built_gpu) != gpu_slug(gpu_name):
        problems.append(f"it was built for GPU '{built_gpu}' but this machine has '{gpu_name}'")
    if built_trt != trt_version:
        problems.append(f"it was built with TensorRT {built_trt} but this machine has TensorRT {trt_version}")
    if problems:
        raise EngineMismatchError(f"engine {engine_entry['file']} cannot run here: {'; '.join(problems)}. {remedy}")


def select_engine(engines: list[dict] | tuple[dict, ...], gpu_name: str, trt_version: str,
                  precision: str | None = None) -> dict | None:
    """The bundle's engine for this GPU and TensorRT version (fp16 first unless precision is given)."""
    matching = []
    for entry in engines:
        try:
            check_engine_compatible(entry, gpu_name, trt_version)
        except EngineMismatchError:
            continue
        if precision is None or entry["precision"] == precision:
            matching.append(entry)
    return min(matching, key=lambda e: e["precision"] != "fp16", default=None)


# --- what this machine has -----------------------------------------------------------------------
def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__


def _cudart():
    """cuda-python's runtime module (its import path moved in cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def _cuda_ok(result, cudart=None):
    """cuda-python returns (error, values...): raise on an error, return the value(s)."""
    cudart = cudart or _cudart()
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA runtime error: {err}")
    return values[0] if len(values) == 1 else tuple(values) or None


def set_device(device: int | None, cudart=None) -> None:
    """Make `device` the CUDA runtime's current device (before any allocation); None leaves it as it is."""
    if device is not None:
        _cuda_ok((cudart or _cudart()).cudaSetDevice(int(device)), cudart)


def detect_gpu(device: int = 0) -> GpuInfo | None:
    """The GPU engines would be built for (CUDA device `device`, counted as CUDA_VISIBLE_DEVICES lists them),
    or None."""
    try:
        cudart = _cudart()
    except ImportError:
        return _gpu_from_nvidia_smi(device)
    try:
        props = _cuda_ok(cudart.cudaGetDeviceProperties(int(device)), cudart)
    except Exception:  # no device, no driver, or a driver too old: cuda-python raises several kinds
        return None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.split("\x00")[0].strip(), f"{props.major}.{props.minor}")


def nvidia_smi_id(device: int = 0, visible: str | None = None) -> str | None:
    """The `nvidia-smi -i` id of CUDA device `device`: through CUDA_VISIBLE_DEVICES (indices or GPU-UUIDs, which
    nvidia-smi accepts both) when set; None when that hides every GPU or has fewer entries."""
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(device)
    entries = [e.strip() for e in visible.split(",")]
    # CUDA stops at the first invalid entry ("-1", "" or "none" hide every GPU)
    valid = []
    for entry in entries:
        if not entry or entry.startswith("-") or entry.lower() == "none":
            break
        valid.append(entry)
    return valid[device] if device < len(valid) else None


def _gpu_from_nvidia_smi(device: int = 0) -> GpuInfo | None:
    smi_id = nvidia_smi_id(device)
    if smi_id is None:
        return None
    for fields in ("name,compute_cap", "name"):  # compute_cap needs a 2021+ driver
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader", "-i", smi_id],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode == 0 and out.stdout.strip():
            parts = [p.strip() for p in out.stdout.strip().splitlines()[0].rsplit(",", fields.count(","))]
            return GpuInfo(parts[0], parts[1] if len(parts) > 1 else None)
    return None


def missing_for_tensorrt() -> list[str]:
    """What this machine lacks to build and check engines; empty when it has everything."""
    missing = []
    if tensorrt_version() is None:
        missing.append("the tensorrt Python package")
    try:
        _cudart()
    except ImportError:
        missing.append("cuda-python (for device memory)")
    if detect_gpu() is None:
        missing.append("an NVIDIA GPU")
    return missing


def join_words(items: list[str]) -> str:
    """['a', 'b', 'c'] -> 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def default_timing_cache(gpu_name: str, trt_version: str) -> Path:
    """A timing cache per GPU model and TensorRT version, under $XDG_CACHE_HOME (~/.cache)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "diffad" / "tensorrt" / f"timing.{gpu_slug(gpu_name)}.trt{trt_version}.cache"


# --- building ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuilderPlan:
    """How to build an engine with one TensorRT version: from which of the bundle's graphs, typing, flags."""

    onnx: str                       # "fp32": model.onnx; "fp16": model.fp16.onnx
    strongly_typed: bool            # the graph's types decide each layer's precision
    set_flags: tuple[str, ...]      # BuilderFlag names to set
    clear_flags: tuple[str, ...]    # BuilderFlag names to clear (where this TensorRT has them)


FP16_GRAPH_MISSING = ("re-export the bundle with `diffad export` (which writes model.fp16.onnx), or build an fp32 "
                      "engine, or use TensorRT 10 (pip install 'tensorrt>=10,<11')")


class FP16GraphMissing(TensorRTUnavailable):
    """TensorRT 11 asked for an fp16 engine from a bundle exported without model.fp16.onnx."""


def trt_major(trt_version: str) -> int:
    try:
        return int(str(trt_version).split(".")[0])
    except ValueError:
        raise ValueError(f"TensorRT version must look like 10.3.0, got {trt_version!r}") from None


def builder_plan(trt_version: str, precision: str, has_fp16_graph: bool) -> BuilderPlan:
    """The build for a TensorRT version and precision (pure).

    TensorRT 10: weak typing from model.onnx, fp16 through the FP16 builder flag. TensorRT 11 removed the
    weak-typing flags and builds only strongly typed networks: an fp16 engine comes from the fp16 graph,
    and without one it is refused here, before anything is parsed. fp32 clears TF32 on both.
    """
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
    if trt_major(trt_version) < 11:
        if precision == "fp16":
            return BuilderPlan("fp32", False, ("FP16",), ())
        return BuilderPlan("fp32", False, (), ("TF32",))
    if precision == "fp32":
        return BuilderPlan("fp32", True, (), ("TF32",))
    if not has_fp16_graph:
        raise FP16GraphMissing(
            f"TensorRT {trt_version} builds only strongly typed networks (no FP16 builder flag), so an fp16 engine "
            f"needs the bundle's fp16 graph, and this bundle has none: {FP16_GRAPH_MISSING}")
    return BuilderPlan("fp16", True, (), ())


def bundle_plan(bundle, trt_version: str, precision: str) -> tuple[BuilderPlan, Path]:
    """The plan for this bundle, and the graph it builds from."""
    if bundle.method != "diffusionad":
        raise BundleError(f"{bundle.path}: TensorRT engines for {bundle.method} bundles are not built yet (their "
                          "graphs serve on ONNX Runtime, CPU or CUDA)")
    fp16_graph = bundle.onnx_fp16_path
    plan = builder_plan(trt_version, precision, fp16_graph is not None)
    return plan, (fp16_graph if plan.onnx == "fp16" else bundle.onnx_path)


def network_flags(trt, plan: BuilderPlan) -> int:
    """create_network's flags: 0 is weakly typed in TensorRT 10 and strongly typed in 11 (its only mode)."""
    if plan.strongly_typed and trt_major(trt.__version__) < 11:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def build_engine(onnx_path: str | Path, engine_path: str | Path, options: EngineOptions,
                 timing_cache: str | Path, plan: BuilderPlan | None = None) -> float:
    """Parse the ONNX graph and build a serialised engine for this GPU; returns the build seconds.

    Without a plan, the graph is taken for model.onnx (an fp16 build on TensorRT 11 then is refused).
    """
    import tensorrt as trt

    if plan is None:
        plan = builder_plan(trt.__version__, options.precision, has_fp16_graph=False)
    set_device(options.device)
    started = time.monotonic()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    shape = tuple(network.get_input(0).shape)[1:]  # (C, H, W); the batch is -1
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (options.min_batch, *shape), (options.opt_batch, *shape),
                      (options.max_batch, *shape))
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"TensorRT refused the batch profile {options.min_batch}/{options.opt_batch}/"
                               f"{options.max_batch} for input shape {shape}")
    for flag in plan.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.clear_flags:
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))  # TF32 off: plain fp32, held to fp32 tolerances

    # The timing cache keeps each kernel's measured speed, so a rebuild skips most of the autotuning.
    timing_cache = Path(timing_cache)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not fit this GPU / TensorRT; starting a fresh one", timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    log.info("building a TensorRT %s engine (%s precision from %s, %s typed, batch %d/%d/%d)...", trt.__version__,
             options.precision, Path(onnx_path).name, "strongly" if plan.strongly_typed else "weakly",
             options.min_batch, options.opt_batch, options.max_batch)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path} (see its messages above)")
    _write_atomic(Path(engine_path), memoryview(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))
    seconds = time.monotonic() - started
    log.info("built %s in %.0f s (timing cache %s)", Path(engine_path).name, seconds, timing_cache)
    return seconds


def unique_temp(folder: Path, prefix: str, suffix: str) -> Path:
    """A new empty file of a unique name in folder (so two writers never share one temporary file)."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.close(fd)
    return Path(name)


def _write_atomic(path: Path, data) -> None:
    tmp = unique_temp(path.parent, f".{path.name}.", ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- loading and running -------------------------------------------------------------------------
def load_engine(bundle_dir: str | Path, engine_entry: dict, gpu_name: str | None = None,
                trt_version: str | None = None, device: int | None = None):
    """Deserialise a bundle's engine after checking it was built for this GPU and TensorRT version."""
    import tensorrt as trt

    if gpu_name is None:
        gpu = detect_gpu(device or 0)
        if gpu is None:
            raise TensorRTUnavailable("no NVIDIA GPU found: TensorRT engines cannot run here")
        gpu_name = gpu.name
    check_engine_compatible(engine_entry, gpu_name, trt_version or trt.__version__)
    set_device(device)
    path = Path(bundle_dir) / engine_entry["file"]
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise BundleError(f"TensorRT could not deserialise {path}")
    return engine


class EngineRunner:
    """Runs an engine on numpy batches: host -> pinned host -> device, execute, device -> pinned -> host, on
    one CUDA stream.

    Device and pinned host buffers grow to the largest batch seen and are reused. Use as a context
    manager, or call close(), to free them. `device` (a CUDA index) is made current before anything;
    `trt` and `cudart` are the tensorrt and cuda-python runtime modules (imported when not given).
    """

    def __init__(self, engine, device: int | None = None, trt=None, cudart=None):
        if trt is None:
            import tensorrt as trt
        self._trt, self._cudart = trt, cudart or _cudart()
        self.stream = None
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._host: dict[str, tuple[int, int]] = {}     # name -> (pinned host pointer, bytes)
        set_device(device, self._cudart)
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = self._ok(self._cudart.cudaStreamCreate())
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(INPUT_NAME)))

    def _ok(self, result):
        return _cuda_ok(result, self._cudart)

    def _grow(self, table: dict, name: str, nbytes: int, malloc, free) -> int:
        pointer, size = table.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                del table[name]
                self._ok(free(pointer))
            pointer = self._ok(malloc(nbytes))
            table[name] = (pointer, nbytes)
        return pointer

    def _device(self, name: str, nbytes: int) -> int:
        return self._grow(self._buffers, name, nbytes, self._cudart.cudaMalloc, self._cudart.cudaFree)

    def _pinned(self, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
        """A numpy view of the pinned host buffer for `name` (grown when too small)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = max(count * dtype.itemsize, 1)
        pointer = self._grow(self._host, name, nbytes, self._cudart.cudaMallocHost, self._cudart.cudaFreeHost)
        raw = (ctypes.c_byte * nbytes).from_address(int(pointer))
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cudart, trt = self._cudart, self._trt
        if images.dtype != self.input_dtype:  # a silent cast would skip the graph's / 255 or double it
            raise ValueError(f"the engine takes {self.input_dtype} images, got {images.dtype}")
        if not self.context.set_input_shape(INPUT_NAME, images.shape):
            raise ValueError(f"batch shape {images.shape} is outside the engine's optimisation profile")
        host = {INPUT_NAME: self._pinned(INPUT_NAME, images.shape, images.dtype)}
        np.copyto(host[INPUT_NAME], images)
        for name in self.outputs:
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            host[name] = self._pinned(name, tuple(self.context.get_tensor_shape(name)), dtype)
        for name, array in host.items():
            self.context.set_tensor_address(name, self._device(name, max(array.nbytes, 1)))
        stream = self.stream
        self._ok(cudart.cudaMemcpyAsync(self._buffers[INPUT_NAME][0], self._host[INPUT_NAME][0],
                                        host[INPUT_NAME].nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                        stream))
        if not self.context.execute_async_v3(int(stream)):
            with contextlib.suppress(Exception):  # the copy in may still be running: let it finish first
                self._ok(cudart.cudaStreamSynchronize(stream))
            raise RuntimeError("TensorRT execution failed (see its messages above)")
        for name in self.outputs:
            self._ok(cudart.cudaMemcpyAsync(self._host[name][0], self._buffers[name][0], host[name].nbytes,
                                            cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        self._ok(cudart.cudaStreamSynchronize(stream))
        # astype copies: the results outlive the pinned buffers, which the next batch overwrites
        return host[MAP_OUTPUT].astype(np.float32), host[SCORE_OUTPUT].astype(np.float32)

    def close(self) -> None:
        """Free every buffer and the stream; when a free fails the others are still tried, then the first
        error is raised."""
        errors = []
        frees = [(self._cudart.cudaFree, p) for p, _ in self._buffers.values()]
        frees += [(self._cudart.cudaFreeHost, p) for p, _ in self._host.values()]
        self._buffers.clear()
        self._host.clear()
        if self.stream is not None:
            frees.append((self._cudart.cudaStreamDestroy, self.stream))
            self.stream = None
        for free, handle in frees:
            try:
                self._ok(free(handle))
            except Exception as e:  # noqa: BLE001 - collected and raised below
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# --- parity and the bundle -----------------------------------------------------------------------
def parity_batch_sizes(options: EngineOptions) -> list[int]:
    """The batch sizes an engine is checked at: its profile's min, opt and max."""
    return sorted({options.min_batch, options.opt_batch, options.max_batch})


def tensorrt_vs_onnx(runner, onnx_path: str | Path, input_dtype: str, size: int, channels: int,
                     options: EngineOptions, batch_sizes: list[int] | None = None) -> dict:
    """The engine against ONNX Runtime (CPU, fp32) at the given batch sizes (default: the profile's min, opt
    and max, since the service warms up and serves at the max)."""
    from .parity import as_graph_input

    batch_sizes = sorted(set(batch_sizes or parity_batch_sizes(options)))
    images = as_graph_input(parity_images(size, channels, count=max(batch_sizes)), input_dtype)
    reference = run_in_batches(onnxruntime_runner(onnx_path), images, 8, whole_batches_only=False)
    report = compare(reference, runner, images, batch_sizes, TENSORRT_TOLERANCES[options.precision],
                     "onnxruntime CPUExecutionProvider (fp32)", f"tensorrt {options.precision}")
    log_report(report)
    return report


def add_engine(bundle_dir: str | Path, options: EngineOptions) -> dict:
    """Build an engine for this GPU from the bundle's graph for this TensorRT (builder_plan), check it,
    record it in bundle.json.

    The engine is kept only if it passes its parity check against ONNX Runtime; an older engine of the
    same name (same GPU, TensorRT version and precision) is replaced. Returns the engines entry.
    """
    missing = missing_for_tensorrt()
    if missing:
        raise TensorRTUnavailable("this machine lacks " + join_words(missing))
    import tensorrt as trt

    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    bundle_plan(bundle, trt.__version__, options.precision)  # refuse an impossible build before anything
    gpu = detect_gpu(options.device or 0)
    name = engine_filename(gpu.name, trt.__version__, options.precision)
    partial = unique_temp(bundle_dir.parent, f".{bundle_dir.name}.{name}.", ".partial")  # outside the bundle
    try:
        entry = {"file": name, **build_checked_engine(bundle, gpu, partial, options)}
        shutil.move(str(partial), bundle_dir / name)
    finally:
        partial.unlink(missing_ok=True)
    manifest = dict(bundle.manifest)
    manifest["engines"] = [e for e in bundle.manifest["engines"] if e["file"] != name] + [entry]
    seal_bundle(bundle_dir, manifest)
    return entry


def build_checked_engine(bundle, gpu: GpuInfo, engine_path: Path, options: EngineOptions) -> dict:
    """Build an engine from the bundle's graph for this TensorRT (model.onnx, or model.fp16.onnx for a
    strongly typed fp16 engine) into engine_path and check it against ONNX Runtime on model.onnx.

    Returns the engine's record (GPU, TensorRT version, precision, the graph it was built from, batch
    profile, parity report; no "file" yet). Raises TensorRTUnavailable before parsing when this TensorRT
    cannot build the precision from what the bundle has, and EngineBuildError, leaving engine_path for the
    caller to remove, if the engine fails parity.
    """
    import tensorrt as trt

    plan, onnx_path = bundle_plan(bundle, trt.__version__, options.precision)
    seconds = build_engine(onnx_path, engine_path, options,
                           options.timing_cache or default_timing_cache(gpu.name, trt.__version__), plan=plan)
    entry = {"gpu": gpu.name, "compute_capability": gpu.compute_capability,
             "tensorrt_version": trt.__version__, "precision": options.precision,
             "onnx_file": Path(onnx_path).name, "strongly_typed": plan.strongly_typed,
             "min_batch": options.min_batch, "opt_batch": options.opt_batch, "max_batch": options.max_batch,
             "input_dtype": bundle.input.dtype, "built_at": _now(), "build_seconds": round(seconds, 1)}
    with EngineRunner(_deserialize(engine_path), device=options.device) as runner:
        report = tensorrt_vs_onnx(runner, bundle.onnx_path, bundle.input.dtype, bundle.input.size,
                                  bundle.input.channels, options)
    if not report["passed"]:
        raise EngineBuildError(f"TensorRT {options.precision} engine failed parity against ONNX Runtime: "
                               + "; ".join(report["failures"]))
    entry["parity"] = report
    return entry


def _deserialize(path: Path):
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise EngineBuildError(f"TensorRT could not deserialise the engine it just built ({path})")
    return engine


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- the engine cache: engines for this GPU kept beside, not inside, a (possibly read-only) bundle ---
# Each engine has a sidecar JSON (same name + .json) recording what it was built from and for: the
# SHA-256 of the source model.onnx, the GPU, the TensorRT version, precision, batch profile and parity
# report, and the engine's own SHA-256. A server uses a cached engine only when all of them match.
SIDECAR_SUFFIX = ".json"
REBUILD_IN_CACHE = "Build one on this machine with `diffad engines BUNDLE_DIR --cache-dir DIR`"


@dataclass(frozen=True)
class CachedEngine:
    path: Path      # the engine file
    record: dict    # its sidecar's content


def bundle_onnx_sha256(bundle: Bundle) -> str:
    """The SHA-256 of the bundle's model.onnx, as bundle.json records (and load_bundle verified) it."""
    return bundle.manifest["files"][bundle.manifest["onnx"]["file"]]


def cached_engine_filename(bundle_name: str, onnx_sha256: str, gpu_name: str, trt_version: str,
                           precision: str) -> str:
    """<name>.<onnx sha256[:16]>.<gpu-slug>.trt<version>.<precision>.engine: one file per model graph, GPU,
    TensorRT version and precision, so several bundles can share one cache folder."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", bundle_name).strip("-")[:64] or "model"
    if not re.fullmatch(r"[0-9a-f]{64}", onnx_sha256):
        raise ValueError(f"not a SHA-256 hex digest: {onnx_sha256!r}")
    return f"{name}.{onnx_sha256[:16]}." + engine_filename(gpu_name, trt_version, precision).removeprefix("model.")


def check_cached_engine(record: dict, onnx_sha256: str, gpu_name: str, trt_version: str) -> None:
    """Refuse a cached engine built from another model.onnx, or for another GPU or TensorRT version."""
    built_from = str(record.get("onnx_sha256"))
    if built_from != onnx_sha256:
        raise EngineMismatchError(
            f"cached engine {record.get('file')} was built from another model.onnx (SHA-256 {built_from[:16]}..., "
            f"the bundle's is {onnx_sha256[:16]}...). {REBUILD_IN_CACHE}")
    check_engine_compatible(record, gpu_name, trt_version, remedy=REBUILD_IN_CACHE)


def read_engine_records(cache_dir: str | Path) -> list[tuple[Path, dict]]:
    """(sidecar path, content) for each readable sidecar in the cache folder; unreadable ones are logged."""
    records = []
    for path in sorted(Path(cache_dir).glob("*.engine" + SIDECAR_SUFFIX)):
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not {"file", "gpu", "tensorrt_version", "precision"} <= set(record):
                raise ValueError("not an engine record")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            log.warning("engine cache: skipping %s: %s", path, e)
            continue
        records.append((path, record))
    return records


def find_cached_engine(cache_dir: str | Path, onnx_sha256: str, gpu_name: str, trt_version: str,
                       precision: str | None = None) -> tuple[CachedEngine | None, list[str]]:
    """The cache's engine for this model graph, GPU and TensorRT version (fp16 first unless precision is
    given), and the reasons each other engine of the folder was passed over."""
    cache_dir = Path(cache_dir)
    passed_over, candidates = [], []
    for _, record in read_engine_records(cache_dir):
        try:
            check_cached_engine(record, onnx_sha256, gpu_name, trt_version)
        except EngineMismatchError as e:
            passed_over.append(str(e))
            continue
        if precision is None or record["precision"] == precision:
            candidates.append(record)
    for record in sorted(candidates, key=lambda r: r["precision"] != "fp16"):
        name = str(record["file"])
        path = cache_dir / name
        if Path(name).name != name:  # a sidecar names a file in its own folder, nothing else
            passed_over.append(f"cached engine record names {name!r}, not a file of {cache_dir}")
        elif not path.is_file():
            passed_over.append(f"cached engine {path} is missing (its sidecar is there)")
        elif sha256_file(path) != record.get("engine_sha256"):
            passed_over.append(f"cached engine {path} does not have the SHA-256 its sidecar records: "
                               f"truncated or replaced. {REBUILD_IN_CACHE}")
        else:
            return CachedEngine(path, record), passed_over
    return None, passed_over


def build_cached_engine(bundle_dir: str | Path, cache_dir: str | Path, options: EngineOptions) -> dict:
    """Build, into cache_dir, the engine for this GPU that the bundle lacks; the bundle is only read.

    Nothing is built when the bundle or the cache already holds an engine for this model graph, GPU,
    TensorRT version, precision and batch profile. Returns {"bundle", "status": "built" | "in-bundle" |
    "cached", "file"} and, when built, the sidecar "record".
    """
    missing = missing_for_tensorrt()
    if missing:
        raise TensorRTUnavailable("this machine lacks " + join_words(missing))
    import tensorrt as trt

    bundle = load_bundle(bundle_dir)
    gpu, version = detect_gpu(), trt.__version__
    profile = {"min_batch": options.min_batch, "opt_batch": options.opt_batch, "max_batch": options.max_batch}
    in_bundle = select_engine(bundle.engines, gpu.name, version, options.precision)
    if in_bundle is not None:
        return {"bundle": str(bundle_dir), "status": "in-bundle", "file": str(bundle.path / in_bundle["file"])}
    cache_dir = Path(cache_dir)
    onnx_sha = bundle_onnx_sha256(bundle)

    def cached_now():
        found, _ = find_cached_engine(cache_dir, onnx_sha, gpu.name, version, options.precision)
        if found is not None and all(found.record.get(k) == v for k, v in profile.items()):
            return {"bundle": str(bundle_dir), "status": "cached", "file": str(found.path)}
        return None

    cached = cached_now()
    if cached is not None:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    bundle_plan(bundle, version, options.precision)  # refuse an impossible build before taking the lock
    name = cached_engine_filename(bundle.name, onnx_sha, gpu.name, version, options.precision)

    def build():
        partial = unique_temp(cache_dir, f".{name}.", ".partial")
        try:
            record = {"file": name, "bundle_name": bundle.name, "onnx_sha256": onnx_sha,
                      **build_checked_engine(bundle, gpu, partial, options)}
            record["engine_sha256"] = sha256_file(partial)
            os.replace(partial, cache_dir / name)
        finally:
            partial.unlink(missing_ok=True)
        write_engine_record(cache_dir, record)  # last: a sidecar means its engine is complete
        return {"bundle": str(bundle_dir), "status": "built", "file": str(cache_dir / name), "record": record}

    return build_under_lock(cache_dir, name, cached_now, build)


def build_under_lock(cache_dir: Path, name: str, cached_now: Callable[[], dict | None],
                     build: Callable[[], dict]) -> dict:
    """build() under an exclusive lock on cache_dir/.<name>.lock, so replicas sharing a cache build an
    engine once; once the lock is held, cached_now() is asked again and its answer returned if not None."""
    with open(Path(cache_dir) / f".{name}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            return cached_now() or build()
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def write_engine_record(cache_dir: str | Path, record: dict) -> Path:
    path = Path(cache_dir) / (record["file"] + SIDECAR_SUFFIX)
    _write_atomic(path, (json.dumps(record, indent=2) + "\n").encode())
    return path

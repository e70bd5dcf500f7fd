"""Throughput of the one-step pipeline: images/s and batch latency for a backend at given batch sizes.

Backends measured here:
  onnxruntime   a bundle's model.onnx through ONNX Runtime (CPU unless a GPU provider is asked for)
  torch         DiffusionAD in PyTorch eager, on the CPU or a CUDA GPU; on a GPU also replayed as a
                CUDA graph (the launch overhead removed, as an engine would), in fp32, tf32, fp16 or bf16;
                fp16 and bf16 as the torch backend serves them (the networks in that dtype, channels-last on
                a GPU, the rest of the pipeline fp32: DiffusionAD.set_network_dtype), not under autocast

Every figure is measured in the same process, one configuration after another, on the same images, so
ratios between rows mean something even on a noisy machine. Usage:

    python -m diffad.benchmarks.throughput onnxruntime BUNDLE_DIR --batch 1 8
    python -m diffad.benchmarks.throughput torch --preset small paper --device cuda --batch 1 8 32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..hardware import cpu_computes_bf16, cpu_flags

Runner = Callable[[np.ndarray], object]


def time_batches(run: Callable[[], object], min_seconds: float, min_iterations: int = 5,
                 warmup: int = 3, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds per call of run(), after warm-up; at least min_iterations calls and min_seconds in all."""
    for _ in range(warmup):
        run()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iterations or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def summarise(times: list[float], batch: int) -> dict:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"batch": batch, "iterations": len(times),
            "images_per_s": round(batch * len(times) / sum(times), 2),
            "batch_latency_ms_p50": round(1e3 * statistics.median(times), 3),
            "batch_latency_ms_p99": round(1e3 * p99, 3)}


def random_images(batch: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, channels, size, size), dtype=np.uint8)


# --- ONNX Runtime -------------------------------------------------------------------------------
def onnxruntime_session(onnx_path: str | Path, threads: int | None = None,
                        providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), options, providers=list(providers))


def bench_onnxruntime(bundle_dir: str | Path, batches: list[int], seconds: float, threads: int | None) -> dict:
    from ..export.bundle import load_bundle
    from ..export.parity import bundle_categories, graph_feed

    bundle = load_bundle(bundle_dir)
    session = onnxruntime_session(bundle.onnx_path, threads)
    spec = bundle.input
    rows = []
    for batch in batches:
        images = random_images(batch, spec.channels, spec.size)
        if spec.dtype == "float32":
            images = images.astype(np.float32) / 255.0
        # a multi-category bundle's graph is timed on its first category
        feed = graph_feed(session, images, bundle_categories(bundle, batch))
        times = time_batches(lambda feed=feed: session.run(None, feed), seconds)
        rows.append({"backend": "onnxruntime-cpu", **summarise(times, batch)})
    return {"model": bundle.name, "input": [spec.channels, spec.size, spec.size], "threads": threads,
            "results": rows}


# --- PyTorch ------------------------------------------------------------------------------------
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
NETWORK_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def bench_torch(presets: list[str], batches: list[int], device: str, precisions: list[str], seconds: float,
                cuda_graphs: bool, channels: int = 3, compiled: bool = False) -> dict:
    import torch

    from ..models.diffusionad import DiffusionAD
    from ..models.presets import describe, preset

    torch.manual_seed(0)
    out = {"models": {}, "results": []}
    if device.startswith("cuda"):
        out["matmul_peak_tflops"] = {p: matmul_peak_tflops(device, p) for p in precisions}
    for name in presets:
        model = DiffusionAD(preset(name, in_channels=channels)).eval()
        out["models"][name] = {k: round(v, 3) for k, v in describe(model).items()}
        model = model.to(device)
        size = model.config.image_size
        reference = None
        for precision in precisions:
            if device == "cpu" and precision in ("tf32", "fp16"):  # GPU formats; bf16 runs where the CPU has it
                continue
            graph = served_graph(model, precision, device)
            for batch in batches:
                images = torch.from_numpy(random_images(batch, channels, size)).to(device)
                run = _torch_call(graph, images, device, precision)
                modes = [("eager", run)]
                if cuda_graphs and device.startswith("cuda"):
                    modes.append(("cuda-graph", _cuda_graph(run)))
                if compiled and device.startswith("cuda"):
                    compiled_graph = torch.compile(graph, dynamic=False)
                    modes.append(("compiled+cuda-graph", _cuda_graph(_torch_call(compiled_graph, images, device,
                                                                                  precision))))
                for mode, fn in modes:
                    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
                    times = time_batches(fn, seconds, sync=sync)
                    row = {"backend": f"torch-{device.split(':')[0]}", "preset": name, "precision": precision,
                           "mode": mode, **summarise(times, batch)}
                    peak = out.get("matmul_peak_tflops", {}).get(precision)
                    if peak:  # 2 FLOPs per multiply-accumulate
                        achieved = row["images_per_s"] * 2 * out["models"][name]["pipeline_gmac_per_image"] / 1e3
                        row["achieved_tflops"] = round(achieved, 1)
                        row["fraction_of_matmul_peak"] = round(achieved / peak, 3)
                    if batch == batches[0]:
                        maps, scores = fn()
                        maps, scores = maps.float().cpu(), scores.float().cpu()
                        if precision == "fp32" and mode == "eager":
                            reference = (maps, scores)
                        elif reference is not None:
                            row["max_map_diff_vs_fp32"] = float((maps - reference[0]).abs().max())
                            row["max_score_diff_vs_fp32"] = float((scores - reference[1]).abs().max())
                    out["results"].append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
            del graph
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def served_graph(model, precision: str, device: str):
    """The uint8 -> (map, score) pipeline as the torch backend serves it in this precision: a copy of the
    model with its networks in fp16 / bf16 (the rest fp32), channels-last convolutions on a GPU."""
    import copy

    import torch

    from ..export.onnx_export import InferenceGraph

    served = copy.deepcopy(model)
    if precision in NETWORK_DTYPES:
        served.set_network_dtype(getattr(torch, NETWORK_DTYPES[precision]))
    if device.startswith("cuda"):
        served = served.to(memory_format=torch.channels_last)
    return InferenceGraph(served, "uint8").eval()


def _torch_call(graph, images, device: str, precision: str) -> Callable[[], tuple]:
    import torch

    def run():
        if device.startswith("cuda"):
            # fp32 means fp32: cuDNN and cuBLAS would otherwise use TF32 tensor cores for convolutions
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        with torch.inference_mode():
            return graph(images)

    return run


def matmul_peak_tflops(device: str, precision: str, n: int = 8192, seconds: float = 2.0) -> float:
    """The GPU's measured dense matrix-product rate (TFLOP/s) in this precision: what 'fraction of peak' means."""
    import torch

    dtype = getattr(torch, NETWORK_DTYPES.get(precision, "float32"))
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = time_batches(lambda: a @ b, seconds, sync=torch.cuda.synchronize)
    return round(2 * n**3 / statistics.median(times) / 1e12, 1)


def _cuda_graph(run: Callable[[], tuple]) -> Callable[[], tuple]:
    """Capture run() once and replay it: the kernels of a whole batch launched as one graph."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the capture (cuDNN picks its algorithms here)
            run()
    torch.cuda.current_stream().wait_stream(stream)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        outputs = run()

    def replay():
        cuda_graph.replay()
        return outputs

    return replay


RELEVANT_CPU_FLAGS = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version()}
    try:
        import os

        info["cpu_count"] = os.cpu_count()
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
        info["cpu_flags"] = sorted(cpu_flags() & RELEVANT_CPU_FLAGS)  # what decides bf16 and vector speed
    except OSError:
        pass
    for module in ("torch", "onnxruntime", "numpy"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            pass
    try:
        import torch

        info["native_bf16_cpu"] = cpu_computes_bf16()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["cuda"] = torch.version.cuda
            info["cudnn"] = torch.backends.cudnn.version()
    except ImportError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffad.benchmarks.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="backend", required=True)
    p = sub.add_parser("onnxruntime", help="a bundle's model.onnx through ONNX Runtime on the CPU")
    p.add_argument("bundle", metavar="BUNDLE_DIR")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p = sub.add_parser("torch", help="DiffusionAD in PyTorch (random weights: speed does not depend on them)")
    p.add_argument("--preset", nargs="+", default=["small"], choices=["tiny", "small", "paper"])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS)
    p.add_argument("--channels", type=int, default=3, choices=[1, 3], help="image channels (default 3)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="eager only")
    p.add_argument("--compile", action="store_true", help="on a GPU, also torch.compile + CUDA graph")
    for p in sub.choices.values():
        p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
        p.add_argument("--seconds", type=float, default=3.0, help="time measured per configuration")
        p.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    args = parser.parse_args(argv)
    if args.backend == "onnxruntime":
        result = bench_onnxruntime(args.bundle, args.batch, args.seconds, args.threads)
    else:
        result = bench_torch(args.preset, args.batch, args.device, args.precision, args.seconds,
                             not args.no_cuda_graphs, args.channels, args.compile)
    result = {"benchmark": "throughput", "machine": machine(), **result}
    emit(result, args.json)
    return 0


def emit(record: dict, json_path: str | Path | None) -> None:
    """A benchmark's result: printed as one JSON object, and written to json_path too when given."""
    text = json.dumps(record, indent=2)
    print(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())

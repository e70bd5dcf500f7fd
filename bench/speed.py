"""`diffad bench speed`: one model, one process, the same images: what each way of running it costs.

Four sections, measured one after another in this process (so their ratios mean something on a noisy
machine), printed as one JSON object on stdout; progress goes to stderr:

  reconstruction  norm-guided one-step (the model's forward), DDIM from t_s in 10 and 50 steps, full
                  DDPM ancestral denoising from t_s (t_s + 1 UNet passes), and D3AD's noise-free guided DDIM
                  from a fixed and from a per-image noise level (models/d3ad.py), each followed by the same
                  segmentation and top-k score: seconds per image, slowdown against one-step, and the
                  detection metrics on a stratified subset of the test set (--limit images, good and
                  defective in the test set's proportions). `--methods` picks among them.
  backends        ONNX Runtime (the bundle's model.onnx) against PyTorch eager at each --batch: images/s
                  and their ratio, with the largest difference between the two on the same images
  compute         achieved FLOP/s of each backend at the largest --batch (2 x the counted MACs per image x
                  images/s) against this machine's float32 matrix-product FLOP/s (numpy and torch, best of
                  a few, measured here)
  service         peak resident memory (VmHWM) of `diffad serve` with this one model loaded, after a few
                  requests: the process and any children, from /proc

RUN_DIR_OR_BUNDLE is a bundle (`diffad export`), a training run folder or a model file; a run is exported
to a temporary bundle first (the ONNX graph and its parity checks, as `diffad export` does).

The method is the model's: for a DeCo-Diff model the reconstruction section has one row, its deterministic
correction (five UNet passes), scored on DATA_DIR's category (the folder's name, one of the model's), and
the backends section times that category's graph. `--against OTHER` times OTHER's graph (a bundle, run or
model file of either method) with ONNX Runtime at the same batches, interleaved with this model's, and
reports their ratio: two methods' exported graphs compared in one run.

    diffad bench speed bundles/dagm_small ../shared/datasets/dagm_class1 --limit 20 --batch 1 8
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import logging
import os
import shlex
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .quality import METRICS

log = logging.getLogger("diffad.bench.speed")

METHODS = ("one-step", "ddim", "ancestral", "d3ad-fixed", "d3ad")



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="RUN_DIR_OR_BUNDLE", help="a bundle folder, a training run folder or a model file")
    p.add_argument("data_dir", metavar="DATA_DIR", help="MVTec-layout category with test/ and ground_truth/")
    p.add_argument("--limit", type=int, default=20,
                   help="test images for the reconstruction comparison, stratified (good and defective in the "
                   "test set's proportions, at least one of each); 0 = all (default 20: ancestral denoising "
                   "is about 100x slower than one-step)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="backend batch sizes (default 1 8)")
    p.add_argument("--recon-batch", type=int, default=8, help="batch size of the reconstruction comparison (default 8)")
    p.add_argument("--ddim-steps", type=int, nargs="+", default=[10, 50], help="DDIM step counts (default 10 50)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"reconstructions compared, comma-separated among {', '.join(METHODS)} (default all; "
                   "d3ad, the per-image level, needs good images the model did not train on: a run's held-out "
                   "images, or the bins of a bundle exported with --mode d3ad)")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="time measured per backend and batch size; also the least time over which the fast "
                   "reconstructions are repeated (default 5)")
    p.add_argument("--threads", type=int, help="intra-op threads for PyTorch and ONNX Runtime (default: all cores)")
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the float32 matrix product (default 2048)")
    p.add_argument("--matmul-repeats", type=int, default=5, help="best of this many products (default 5)")
    p.add_argument("--service-backend", default="onnxruntime", choices=("auto", "onnxruntime", "tensorrt", "torch"),
                   help="backend of the served model in the memory measurement (default onnxruntime)")
    p.add_argument("--service-requests", type=int, default=16, help="requests sent before reading memory (default 16)")
    p.add_argument("--no-service", action="store_true", help="skip the service memory measurement")
    p.add_argument("--against", metavar="OTHER",
                   help="another bundle, run or model file (of either method, same input size) whose ONNX graph is "
                   "timed at the same batches, side by side with this one's")
    p.add_argument("--json", metavar="FILE", help="also write the result to FILE")


# --- the model and the images ----------------------------------------------------------------------
def stratified(samples: list, limit: int | None) -> list:
    """At most `limit` samples, good and defective in the set's proportions (at least one of each), evenly
    spread over each class (so every defect type of a sorted list gets its share). limit 0/None: all."""
    if not limit or limit >= len(samples):
        return list(samples)
    if limit < 2:
        raise ValueError(f"--limit must be 0 (all) or at least 2 (one good, one defective), got {limit}")
    good = [s for s in samples if s.label == 0]
    bad = [s for s in samples if s.label == 1]
    n_bad = min(len(bad), max(1, round(limit * len(bad) / len(samples))))
    n_good = min(len(good), limit - n_bad)
    n_bad = min(len(bad), limit - n_good)

    def spread(items: list, n: int) -> list:
        return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)] if n else []

    return spread(good, n_good) + spread(bad, n_bad)


class ModelSource:
    """The torch model and a bundle for it: the given bundle, or a temporary export of the given run."""

    def __init__(self, path: str | Path):
        from ..export.bundle import MANIFEST_FILE, WEIGHTS_FILE, load_bundle
        from ..models import checkpoint as ckpt

        self.path = Path(path)
        self._tmp = None
        if (self.path / MANIFEST_FILE).is_file():
            self.kind = "bundle"
            self.bundle = load_bundle(self.path)  # verifies every file's hash
            self.model = ckpt.load_model(self.path / WEIGHTS_FILE)
            return
        from ..export.exporter import ExportOptions, export_bundle

        self.model = ckpt.load_model(self.path)  # CheckpointError names the file when it is missing or broken
        self._tmp = Path(tempfile.mkdtemp(prefix="diffad-speed-"))
        if self.path.is_file():  # a model file: a run folder around it
            self.kind = "model file"
            run_dir = self._tmp / "run"
            run_dir.mkdir()
            shutil.copyfile(self.path, run_dir / ckpt.MODEL_FILE)
        else:
            self.kind = "run"
            run_dir = self.path
        log.info("exporting %s to a temporary bundle (ONNX graph and parity checks)", self.path)
        name = self.path.stem if self.path.is_file() else self.path.resolve().name
        export_bundle(run_dir, self._tmp / "bundle", ExportOptions(name=name))
        self.bundle = load_bundle(self._tmp / "bundle")

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def load_test_images(data_dir: str | Path, size: int, channels: int, limit: int | None):
    """(samples used, images [N, H, W, C] float32 0..1, masks [N, H, W], labels [N], total test images)."""
    from ..training.data import find_test_samples, read_image, read_mask

    samples = find_test_samples(data_dir)
    chosen = stratified(samples, limit)
    images = np.stack([read_image(s.path, size, channels) for s in chosen])
    masks = np.stack([read_mask(s.mask_path, size) if s.mask_path else np.zeros((size, size), np.float32)
                      for s in chosen])
    labels = np.array([s.label for s in chosen])
    return chosen, images, masks, labels, len(samples)


def as_uint8_nchw(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray((np.clip(images, 0, 1) * 255).round().astype(np.uint8).transpose(0, 3, 1, 2))


def tile_batch(images: np.ndarray, batch: int) -> np.ndarray:
    """`batch` images taken in turn from `images` (repeated when there are fewer)."""
    return np.ascontiguousarray(images[np.arange(batch) % len(images)])


# --- (a) reconstruction methods ---------------------------------------------------------------------
def d3ad_settings(model, own, source_path: Path, mode: str):
    """D3AD settings for `mode` on this model (in one-step mode; `own` its D3AD settings as loaded): a
    bundle's own (exported with --mode d3ad), else bins from the one-step scores of the run's held-out good
    images; None (with the reason logged) when there are none."""
    from ..evaluation.d3ad import good_images_for, one_step_bin_edges, read_good_images

    if mode == "fixed" or own.bin_edges:
        return dataclasses.replace(own, mode=mode)
    run_dir = source_path if source_path.is_dir() else source_path.parent
    try:
        good = read_good_images(good_images_for(run_dir), model)
    except ValueError as e:
        log.warning("d3ad (per-image level) left out: %s", e)
        return None
    return dataclasses.replace(own, mode="dynamic", bin_edges=one_step_bin_edges(model, good))


def compare_reconstructions(model, images: np.ndarray, masks: np.ndarray, labels: np.ndarray, batch_size: int,
                            ddim_steps: list[int], min_seconds: float, methods_asked=METHODS,
                            d3ad: dict | None = None) -> dict:
    """`d3ad`: {"d3ad-fixed": D3ADConfig, "d3ad": D3ADConfig} for the D3AD rows (a missing one is left out).
    The model's own reconstruction must be one-step (its forward is the one-step row)."""
    import torch

    from ..evaluation.evaluate import pipeline, reconstruction_method

    cfg = model.config
    if cfg.d3ad.mode != "off":
        raise ValueError("compare_reconstructions needs the model in one-step mode (set_d3ad(D3ADConfig()))")
    methods = [("one-step", None, 2)] if "one-step" in methods_asked else []
    if "ddim" in methods_asked:
        methods += [(f"ddim-{k}", ("ddim", k), len(model.schedule.ddim_timesteps(cfg.t_s, k))) for k in ddim_steps]
    if "ancestral" in methods_asked:
        methods += [("ancestral", ("ancestral", None), cfg.t_s + 1)]
    for name in ("d3ad-fixed", "d3ad"):
        settings = (d3ad or {}).get(name)
        if name in methods_asked and settings is not None:
            passes = settings.steps + (2 if settings.mode == "dynamic" else 0)  # the one-step first pass
            methods.append((name, ("d3ad", None, settings), passes))
    if not methods or methods[0][0] != "one-step":
        raise ValueError("--methods must include one-step: the other rows are measured against it")
    # Warm-up, not timed: first calls at a new input shape allocate and choose kernels. Every shape the
    # timed runs meet: full and last batches, through the UNet at n (iterative) and 2n (one-step) images.
    with torch.inference_mode():
        for n in sorted({min(batch_size, len(images)), len(images) % batch_size} - {0}):
            batch = torch.from_numpy(np.ascontiguousarray(images[:n].transpose(0, 3, 1, 2)))
            model(batch)
            pipeline(model, batch, reconstruction_method(model, "ddim", 1))
    rows = [timed_row(model, images, masks, labels, batch_size, min_seconds, name, passes,
                      reconstruction_method(model, *spec) if spec else None) for name, spec, passes in methods]
    base = rows[0]["seconds_per_image"]
    for row in rows:
        row["slowdown_vs_one_step"] = round(row["seconds_per_image"] / base, 2)
        row["seconds_per_image"] = round(row["seconds_per_image"], 6)
    out = {"batch_size": batch_size, "t_s": cfg.t_s, "t_l": cfg.t_l,
           "note": "one-step = two UNet passes as one batched call (t_s and t_l), the norm-guided blend; DDIM "
                   "(eta 0) and ancestral start from the image noised at t_s with the model's fixed noise; "
                   "ancestral draws seeded step noise; d3ad-fixed / d3ad: noise-free input-guided DDIM from "
                   "max_step / from a level per image (its one-step score's bin among held-out good images'); "
                   "all use the same segmentation and top-k score",
           "methods": rows}
    used = {name: dataclasses.asdict(v) for name, v in (d3ad or {}).items() if v is not None}
    if used:
        out["d3ad"] = used
    return out


def timed_row(model, images: np.ndarray, masks: np.ndarray, labels: np.ndarray, batch_size: int,
              min_seconds: float, name: str, passes: int, reconstruct=None) -> dict:
    """One reconstruction's row: seconds per image (unrounded) over the whole subset, run once and repeated
    while under min_seconds (the fast methods), and its detection metrics. The caller warms up first."""
    from ..evaluation.evaluate import predict
    from ..evaluation.metrics import compute_metrics
    from .throughput import time_batches

    outputs = []

    def one_pass():  # the whole subset, its progress bar once
        outputs.append(predict(model, images, batch_size, desc=name, progress=not outputs, reconstruct=reconstruct))

    times = time_batches(one_pass, min_seconds, min_iterations=1, warmup=0)
    maps, scores = outputs[0]
    metrics = compute_metrics(labels, scores, masks, maps)
    row = {"method": name, "unet_passes_per_image": passes, "repeats": len(times),
           "seconds_per_image": sum(times) / (len(times) * len(images)),
           **{k: round(float(metrics[k]), 4) for k in METRICS},
           "score_mean_good": round(float(scores[labels == 0].mean()), 5),
           "score_mean_defective": round(float(scores[labels == 1].mean()), 5)}
    log.info("%s: %.4f s/image, image AUROC %.3f, pixel AUROC %.3f", name, row["seconds_per_image"],
             row["image_auroc"], row["pixel_auroc"])
    return row


def time_decodiff(model, images: np.ndarray, masks: np.ndarray, labels: np.ndarray, batch_size: int,
                  min_seconds: float) -> dict:
    """DeCo-Diff's one row: its correction (the model's forward, for its category), timed and scored."""
    import torch

    with torch.inference_mode():  # warm-up at the full and the last batch's shapes
        for n in sorted({min(batch_size, len(images)), len(images) % batch_size} - {0}):
            model(torch.from_numpy(np.ascontiguousarray(images[:n].transpose(0, 3, 1, 2))))
    row = timed_row(model, images, masks, labels, batch_size, min_seconds, "decodiff", len(model.config.timesteps))
    row["seconds_per_image"] = round(row["seconds_per_image"], 6)
    return {"batch_size": batch_size, "category": model.config.categories[model.category],
            "timesteps": model.config.timesteps,
            "note": "DeCo-Diff: the clean image taken as the state at step 8, corrected in deterministic steps "
                    "8, 6, 4, 2, 0; the map from the input against its correction; the score its maximum",
            "methods": [row]}


def decodiff_view(model, bundle, data_dir: str | Path):
    """A DeCo-Diff model set to DATA_DIR's category, and the bundle's model (graph) for that category."""
    categories = model.config.categories
    # several: the folder's name says which, as `diffad evaluate` reads it (set_category names the known ones)
    model.set_category(categories[0] if len(categories) == 1 else Path(data_dir).resolve().name)
    category = categories[model.category]
    view = next((b for b in bundle.models() if b.category in (category, None)), bundle)
    return model, view


# --- (b) ONNX Runtime against PyTorch eager ---------------------------------------------------------
def compare_backends(model, bundle, images_uint8: np.ndarray, batches: list[int], seconds: float,
                     threads: int | None, against=None) -> dict:
    """`against`: another bundle whose graph is timed with ONNX Runtime after this one's at each batch."""
    import torch

    from ..export.onnx_export import InferenceGraph
    from ..export.parity import as_graph_input, bundle_categories, graph_feed
    from .throughput import onnxruntime_session, summarise, time_batches

    spec = bundle.input
    session = onnxruntime_session(bundle.onnx_path, threads)
    graph = InferenceGraph(model, spec.dtype).eval()
    other = onnxruntime_session(against.onnx_path, threads) if against is not None else None
    rows, ratios, diffs, against_rows, against_ratios = [], {}, {}, [], {}
    for batch in batches:
        images = as_graph_input(tile_batch(images_uint8, batch), spec.dtype)
        tensor = torch.from_numpy(images)

        def run_torch(tensor=tensor):
            with torch.inference_mode():
                return graph(tensor)

        feed = graph_feed(session, images, bundle_categories(bundle, batch))

        def run_ort(feed=feed):
            return session.run(None, feed)

        ort_maps, ort_scores = run_ort()
        torch_maps, torch_scores = (t.numpy() for t in run_torch())
        diffs[str(batch)] = {"map": float(np.abs(ort_maps - torch_maps).max()),
                             "score": float(np.abs(ort_scores - torch_scores).max())}
        by_backend = {}
        for backend, fn in (("onnxruntime-cpu", run_ort), ("torch-cpu-eager", run_torch)):
            row = {"backend": backend, **summarise(time_batches(fn, seconds), batch)}
            rows.append(row)
            by_backend[backend] = row["images_per_s"]
            log.info("%s batch %d: %.2f images/s", backend, batch, row["images_per_s"])
        ratios[str(batch)] = round(by_backend["onnxruntime-cpu"] / by_backend["torch-cpu-eager"], 3)
        if other is not None:
            other_images = as_graph_input(tile_batch(images_uint8, batch), against.input.dtype)
            feed = graph_feed(other, other_images, bundle_categories(against, batch))
            row = {"backend": "onnxruntime-cpu", "model": against.name, **summarise(
                time_batches(lambda feed=feed: other.run(None, feed), seconds), batch)}
            against_rows.append(row)
            against_ratios[str(batch)] = round(by_backend["onnxruntime-cpu"] / row["images_per_s"], 3)
            log.info("%s (against) batch %d: %.2f images/s", against.name, batch, row["images_per_s"])
    out = {"input_dtype": spec.dtype, "threads": threads or os.cpu_count(), "seconds_per_configuration": seconds,
           "results": rows, "onnxruntime_over_torch": ratios, "max_abs_diff_onnxruntime_vs_torch": diffs}
    if against is not None:
        out["against"] = {"model": against.name, "method": against.method, "onnx": against.onnx_path.name,
                          "results": against_rows, "this_over_against_images_per_s": against_ratios}
    return out


# --- (c) achieved FLOP/s against a matrix product ---------------------------------------------------
def matmul_flops(size: int, repeats: int) -> dict:
    """float32 size x size matrix product FLOP/s (2 n^3 per product), best of `repeats`, numpy and torch."""
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out = {"size": size, "repeats": repeats}
    for name, fn in (("numpy", lambda: a @ b), ("torch", lambda: torch.mm(ta, tb))):
        fn()  # warm-up
        best = min(_timed(fn) for _ in range(max(1, repeats)))
        out[f"{name}_gflops"] = round(2 * size**3 / best / 1e9, 2)
    out["peak_gflops"] = max(out["numpy_gflops"], out["torch_gflops"])
    out["numpy_blas"] = _numpy_blas()
    return out


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _numpy_blas() -> str | None:
    try:
        config = np.show_config(mode="dicts")
        return config["Build Dependencies"]["blas"]["name"]
    except Exception:  # the layout of numpy's build information is not a stable interface
        return None


def achieved_compute(model, backends: dict, batch: int, matmul: dict) -> dict:
    from ..models.presets import count_gmac

    gmac = count_gmac(model)
    flops_per_image = 2e9 * gmac["pipeline"]
    rows = []
    for row in backends["results"]:
        if row["batch"] != batch:
            continue
        achieved = flops_per_image * row["images_per_s"] / 1e9
        rows.append({"backend": row["backend"], "batch": batch, "images_per_s": row["images_per_s"],
                     "achieved_gflops": round(achieved, 2),
                     "fraction_of_peak": round(achieved / matmul["peak_gflops"], 4)})
    return {"gmac_per_image": {k: round(v, 4) for k, v in gmac.items()},
            "flop_count": "2 x the multiply-accumulates torch's FLOP counter sees (convolutions, matrix products, "
                          "attention) for the pipeline's UNet passes (+ segmentation for DiffusionAD); "
                          "normalisations and activations excluded",
            "matmul": matmul, "backends": rows}


# --- (d) the service's resident memory --------------------------------------------------------------
def proc_memory(pid: int) -> dict | None:
    """VmHWM (peak resident) and VmRSS of a process, MiB, from /proc (None where unreadable)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "Name"):
            values[key] = rest.strip()
    if "VmHWM" not in values:
        return None
    mib = {k: round(int(values[k].split()[0]) / 1024, 1) for k in ("VmHWM", "VmRSS")}
    return {"pid": pid, "name": values.get("Name"), "vm_hwm_mib": mib["VmHWM"], "vm_rss_mib": mib["VmRSS"]}


def descendants(pid: int) -> list[int]:
    """Every child, grandchild, ... of pid (Linux /proc/<pid>/task/<tid>/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += children
            todo += children
    return found


def service_memory(bundle, backend: str, requests: int, payload: bytes, threads: int | None,
                   max_batch_size: int) -> dict:
    from .load import ServerProcess, drive

    started = time.perf_counter()
    with ServerProcess(str(bundle.path), backend, max_batch_size, 5.0, 4, threads) as server:
        ready_s = time.perf_counter() - started
        pid = server.process.pid
        idle = proc_memory(pid)
        load = asyncio.run(drive(server.url, payload, concurrency=min(4, requests), seconds=0.0,
                                 requests=requests, map_format="png", warmup_requests=0))
        main = proc_memory(pid)
        children = [m for m in (proc_memory(c) for c in descendants(pid)) if m]
        server_backend = server.backend
    if main is None:
        return {"error": f"/proc/{pid}/status unreadable (not Linux?)", "backend": server_backend}
    processes = [main, *children]
    return {"backend": server_backend, "command": shlex.join(server.command), "seconds_to_ready": round(ready_s, 2),
            "requests": load["requests"], "ok": load["ok"], "statuses": load["statuses"],
            "idle_after_warmup_vm_rss_mib": idle["vm_rss_mib"] if idle else None,
            "vm_hwm_mib": main["vm_hwm_mib"], "vm_rss_mib": main["vm_rss_mib"],
            "children": children,
            "total_vm_hwm_mib": round(sum(p["vm_hwm_mib"] for p in processes), 1),
            "model_onnx_mib": round(bundle.onnx_path.stat().st_size / 2**20, 2)}


def png_bytes(image_uint8_chw: np.ndarray) -> bytes:
    from PIL import Image

    pixels = image_uint8_chw[0] if image_uint8_chw.shape[0] == 1 else image_uint8_chw.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


# --- the command -------------------------------------------------------------------------------------
def run(args) -> int:
    import torch

    from ..models.presets import count_parameters
    from .throughput import emit, machine

    batches = sorted(set(args.batch))
    if min(batches) < 1 or args.recon_batch < 1 or min(args.ddim_steps) < 1:
        raise ValueError("--batch, --recon-batch and --ddim-steps must be positive")
    if args.limit < 0 or args.limit == 1:
        raise ValueError(f"--limit must be 0 (all) or at least 2 (one good, one defective), got {args.limit}")
    if args.seconds < 0 or args.matmul_size < 1 or args.service_requests < 1:
        raise ValueError("--seconds must be 0 or more, --matmul-size and --service-requests positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the progress
    command = getattr(args, "command", None) or shlex.join(["diffad", "bench", "speed", args.model, args.data_dir])
    from ..models.decodiff import DeCoDiff

    source, against = ModelSource(args.model), None
    try:
        against = ModelSource(args.against) if args.against else None  # inside: a failure still cleans up
        model, bundle = source.model.eval(), source.bundle
        decodiff = isinstance(model, DeCoDiff)
        if decodiff:
            model, bundle = decodiff_view(model, bundle, args.data_dir)
        other = None
        if against is not None:
            other = against.bundle
            if isinstance(against.model, DeCoDiff):
                _, other = decodiff_view(against.model, other, args.data_dir)
            if (other.input.size, other.input.channels) != (bundle.input.size, bundle.input.channels):
                raise ValueError(f"--against {args.against}: its input is {other.input.channels}x{other.input.size}, "
                                 f"this model's {bundle.input.channels}x{bundle.input.size}: compare like with like")
        cfg = model.config
        chosen, images, masks, labels, total = load_test_images(args.data_dir, cfg.image_size, cfg.in_channels,
                                                                args.limit)
        log.info("%d of %d test images (%d good, %d defective); %s %s, %d px, %d channel(s)", len(chosen), total,
                 int((labels == 0).sum()), int(labels.sum()), source.kind, args.model, cfg.image_size,
                 cfg.in_channels)
        out = {
            "benchmark": "speed",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command,
            "machine": machine(),
            "model": {"source": str(args.model), "kind": source.kind, "name": bundle.name,
                      "method": "decodiff" if decodiff else "diffusionad", "preset": cfg.name,
                      "image_size": cfg.image_size, "channels": cfg.in_channels,
                      **({"categories": list(cfg.categories), "category": bundle.category} if decodiff else
                         {"t_s": cfg.t_s, "t_l": cfg.t_l,
                          "segmentation_params_m": round(count_parameters(model.segmentation) / 1e6, 3)}),
                      "unet_params_m": round(count_parameters(model.unet) / 1e6, 3)},
            "data": {"data_dir": str(args.data_dir), "test_images": total, "used": len(chosen),
                     "good": int((labels == 0).sum()), "defective": int(labels.sum()),
                     "defect_types": sorted({s.defect_type for s in chosen} - {"good"}), "limit": args.limit},
        }
        if decodiff:
            log.info("(a) DeCo-Diff's correction on %d images (category %s)", len(chosen), bundle.category)
            out["reconstruction"] = time_decodiff(model, images, masks, labels, args.recon_batch, args.seconds)
        else:
            from ..models.d3ad import D3ADConfig

            methods_asked = [m.strip() for m in args.methods.split(",") if m.strip()]
            unknown = sorted(set(methods_asked) - set(METHODS))
            if unknown:
                raise ValueError(f"--methods: unknown {', '.join(unknown)}; choose among {', '.join(METHODS)}")
            own = model.config.d3ad
            model.set_d3ad(D3ADConfig(steps=own.steps, w=own.w, max_step=own.max_step))  # its forward: one-step
            d3ad = {name: d3ad_settings(model, own, source.path, mode) for name, mode in
                    (("d3ad-fixed", "fixed"), ("d3ad", "dynamic")) if name in methods_asked}
            log.info("(a) reconstruction methods on %d images", len(chosen))
            out["reconstruction"] = compare_reconstructions(model, images, masks, labels, args.recon_batch,
                                                            args.ddim_steps, args.seconds, methods_asked, d3ad)
            model.set_d3ad(own)  # the backends section compares the bundle's graph with this model
        uint8 = as_uint8_nchw(images)
        log.info("(b) ONNX Runtime against PyTorch eager at batch %s", ", ".join(map(str, batches)))
        out["backends"] = compare_backends(model, bundle, uint8, batches, args.seconds, args.threads, other)
        log.info("(c) float32 matrix product, %d x %d", args.matmul_size, args.matmul_size)
        out["compute"] = achieved_compute(model, out["backends"], batches[-1],
                                          matmul_flops(args.matmul_size, args.matmul_repeats))
        if args.no_service:
            out["service"] = None
        elif decodiff and len(cfg.categories) > 1:
            log.warning("(d) skipped: a multi-category bundle serves one model per category, and the load "
                        "generator names none")
            out["service"] = None
        else:
            log.info("(d) memory of `diffad serve` with this model (%s backend)", args.service_backend)
            defective = int(np.flatnonzero(labels == 1)[0])
            out["service"] = service_memory(bundle, args.service_backend, args.service_requests,
                                            png_bytes(uint8[defective]), args.threads, max(batches))
    finally:
        source.close()
        if against is not None:
            against.close()
    emit(out, args.json)
    return 0


# --- the README's speed tables ----------------------------------------------------------------------
# The targets for the 2-core CPU: (what, how it is read off the records, the bound)
TARGETS = {
    "one_step_vs_ddim_10": 3.0,          # one-step at least 3x faster than 10-step DDIM
    "one_step_vs_ancestral": 50.0,       # and at least 50x faster than ancestral denoising from t_s
    "onnxruntime_over_torch_batch_8": 1.3,
    "fraction_of_matmul_peak": 0.40,
    "service_over_bare_backend": 0.90,
}


def _verdict(value: float | None, bound: float) -> str:
    return "n/a" if value is None else ("met" if value >= bound else "**not met**")


def markdown_tables(speed: dict, load: dict | None = None) -> str:
    """The README's speed section from one `bench speed` record (and a `bench load` record, when given):
    the reconstruction methods side by side, then every target with its figure and verdict."""
    rec = speed["reconstruction"]
    rows = rec["methods"]
    lines = ["| reconstruction | UNet passes / image | s / image | slower than one-step | image AUROC | pixel AUROC |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['unet_passes_per_image']} | {r['seconds_per_image']:.4f} | "
                     f"{r['slowdown_vs_one_step']:.1f}x | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} |")
    by_name = {r["method"]: r for r in rows}
    one = by_name["one-step"]
    others = [r for r in rows if r["method"] != "one-step"]
    no_worse = all(one["image_auroc"] >= r["image_auroc"] and one["pixel_auroc"] >= r["pixel_auroc"] for r in others)
    ratio = speed["backends"]["onnxruntime_over_torch"].get("8")
    compute = speed["compute"]
    ort = next((b for b in compute["backends"] if b["backend"].startswith("onnxruntime")), None)
    targets = [
        ("one-step vs 10-step DDIM, speed", by_name.get("ddim-10", {}).get("slowdown_vs_one_step"),
         TARGETS["one_step_vs_ddim_10"], "x"),
        ("one-step vs ancestral from t_s, speed", by_name.get("ancestral", {}).get("slowdown_vs_one_step"),
         TARGETS["one_step_vs_ancestral"], "x"),
        ("ONNX Runtime over PyTorch eager, batch 8", ratio, TARGETS["onnxruntime_over_torch_batch_8"], "x"),
        (f"ONNX Runtime FLOP/s over the matrix-product peak, batch {ort['batch']}" if ort else
         "ONNX Runtime FLOP/s over the matrix-product peak", ort["fraction_of_peak"] if ort else None,
         TARGETS["fraction_of_matmul_peak"], "%"),
    ]
    if load is not None:
        batching = next(r for r in load["runs"] if r["mode"] == "batching")
        bare = next((b for b in load["bare_backend"] if b["batch"] == batching["max_batch_size"]), None)
        service = batching["throughput_img_s"] / bare["images_per_s"] if bare else None
        targets.append((f"service under load over the bare backend, batch {batching['max_batch_size']}, "
                        f"{load['concurrency']} clients", service, TARGETS["service_over_bare_backend"], "%"))
    lines += ["", "| target | figure | bound | verdict |", "|---|---|---|---|"]
    for what, value, bound, unit in targets:
        shown = "n/a" if value is None else (f"{value:.2f}x" if unit == "x" else f"{100 * value:.0f} %")
        bound_shown = f">= {bound:g}x" if unit == "x" else f">= {100 * bound:.0f} %"
        lines.append(f"| {what} | {shown} | {bound_shown} | {_verdict(value, bound)} |")
    auroc = ", ".join(f"{r['method']} {r['image_auroc']:.3f} / {r['pixel_auroc']:.3f}" for r in rows)
    lines.append(f"| one-step image / pixel AUROC no worse than the iterative ones | {auroc} | one-step >= each | "
                 f"{'met' if no_worse else '**not met**'} |")
    memory = speed.get("service") or {}
    data = speed["data"]
    footer = (f"\n\nModel `{speed['model']['name']}` ({speed['model']['preset']}, {speed['model']['image_size']} px, "
              f"{speed['model']['channels']} channel(s)); reconstruction on {data['used']} of {data['test_images']} "
              f"test images of `{Path(data['data_dir']).name}`, batch {rec['batch_size']}; matrix product "
              f"{compute['matmul']['peak_gflops']:.1f} GFLOP/s, inference "
              f"{ort['achieved_gflops'] if ort else 'n/a'} GFLOP/s")
    if memory.get("total_vm_hwm_mib"):
        footer += f"; service peak resident memory {memory['total_vm_hwm_mib']:.0f} MiB ({memory['backend']})"
    cpu = speed["machine"].get("cpu") or speed["machine"].get("processor")
    return "\n".join(lines) + footer + f". Machine: {cpu}, {speed['machine'].get('cpu_count')} cores."

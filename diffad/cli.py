"""The `diffad` command line: train, evaluate and describe DiffusionAD models.

Heavy imports (torch) happen inside each verb, so `diffad --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

EPILOG = """\
examples:
  diffad presets
  diffad train ../shared/datasets/dagm_class1 --out runs/dagm --preset small --max-minutes 30
  diffad evaluate runs/dagm ../shared/datasets/dagm_class1 --json runs/dagm/eval.json

DATA_DIR is an MVTec AD category (train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png,
optionally validation/good) or, for training, a plain folder of good images.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _sigma(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 (no smoothing) or a positive number of pixels, got {text}")
    return value


EXPORT_DESCRIPTION = """\
Export the whole one-step inference as one ONNX graph (images in, uint8 or float32 NCHW, dynamic batch;
anomaly map and image score out; the fixed noise inside), check it against PyTorch at batch 1 and 8, and
write BUNDLE_DIR: bundle.json, model.onnx and model.safetensors. The threshold comes from
RUN_DIR/calibration.json; a run without one (run `diffad evaluate` first) is exported with threshold null
and a warning. With --tensorrt, also build and check a TensorRT engine for this machine's GPU.

A DeCo-Diff run (--method decodiff) exports its deterministic correction (the UNet calls unrolled) as one
graph, checked the same way. A multi-category model's graph also takes each image's category index, and
each category keeps its own threshold (RUN_DIR/calibration.<category>.json): `diffad serve` then serves each
category as the model <name>.<category>, all on one set of weights and one batcher.
"""

EXPORT_EPILOG = """\
examples:
  diffad export runs/dagm --out bundles/dagm
  diffad export runs/dagm --out bundles/dagm --overwrite --tensorrt --fp16 --max-batch 16
  diffad export runs/three --out bundles/three   (a DeCo-Diff model of three categories)

exit status:
  0  bundle written. With --tensorrt on a machine that cannot build engines (no NVIDIA GPU, no tensorrt
     package or no cuda-python) the bundle holds the ONNX model only and one warning line names what is
     missing: engines are built on the GPU host that runs them.
  1  a check failed (ONNX or TensorRT parity) or TensorRT could not build the engine; nothing is written.
  2  bad arguments, a missing or broken run, or BUNDLE_DIR exists (see --overwrite).
"""


EXPORT_TRITON_DESCRIPTION = """\
Write model bundles into an NVIDIA Triton Inference Server model repository: REPO/<name>/config.pbtxt
(backend onnxruntime, or platform tensorrt_plan with --tensorrt; the uint8 NCHW input, the map and score
outputs, dynamic batching with a queue delay and bound, instance groups, a version policy, and the bundle's
calibration as parameters) and REPO/<name>/<version>/, which is the bundle itself. A bundle already in the
repository keeps its version number; another one becomes the next version, and config.pbtxt follows the
newest. Serve REPO with tritonserver, and point the diffad gateway at it (DIFFAD_BACKEND=triton).
"""

EXPORT_TRITON_EPILOG = """\
examples:
  diffad export-triton bundles/dagm bundles/tile --out triton-repo
  diffad export-triton bundles/dagm --out triton-repo --tensorrt --tensorrt-version 10.8.0 --max-batch-size 16
  tritonserver --model-repository=triton-repo --model-control-mode=poll

exit status: 0 written; 2 a missing or broken bundle, a name Triton refuses, or no engine for --tensorrt.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffad", description="DiffusionAD visual anomaly detection: train on good images, find defects.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("train", help="train a model on a folder of good images",
                         description="Train the reconstruction UNet and the segmentation network jointly on "
                         "good images, with synthetic anomalies made on the fly (offline: self-augmentation, "
                         "blurred and restyled patches, procedural textures). A weights average (EMA) is scored "
                         "every --validate-every steps on good images kept out of training (validation/good, "
                         "else a held-out share of train/good) with fixed synthetic anomalies; the best is kept "
                         "and its t_s chosen on the same images (test labels are never used). Writes "
                         "config.json, checkpoints/, best.safetensors, model.safetensors, train_log.jsonl, "
                         "validation_log.jsonl and train_summary.json into RUN_DIR.")
    p.add_argument("data_dir", metavar="DATA_DIR", nargs="+",
                   help="MVTec-layout category or plain folder of good images; with --method decodiff, one or "
                   "more (one model for all, the folder's name its category)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for checkpoints and the model")
    p.add_argument("--method", choices=("diffusionad", "decodiff"), default="diffusionad",
                   help="diffusionad (default): one-step reconstruction + segmentation network, one category; "
                   "decodiff: DeCo-Diff's deviation-correcting UNet on good images only (no synthetic anomalies "
                   "in training; they only score validation), one model for one or several categories")
    p.add_argument("--preset", choices=("tiny", "small", "paper"), default="small",
                   help="model size: tiny (tests, seconds), small (2-core CPU, 30 min), paper (published size); "
                   "default small")
    p.add_argument("--image-size", type=_positive_int, help="square input size (default: the preset's)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 or 3 (default: detected from the images)")
    p.add_argument("--max-steps", type=_positive_int, help="stop after this many optimiser steps (in total)")
    p.add_argument("--max-minutes", type=_positive_float, help="stop after this much wall-clock time (this run)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="default 8")
    p.add_argument("--unet-lr", type=_positive_float, help="UNet learning rate (default: by preset)")
    p.add_argument("--seg-lr", type=_positive_float, help="segmentation learning rate (default: by preset)")
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine: decay to 5%% over the budget (steps or minutes, whichever ends first) after a "
                   "50-step warm-up; constant: the warm-up only (default cosine)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, anomalies, noise (default 0)")
    p.add_argument("--foreground", choices=("auto", "none"), default="auto",
                   help="where anomalies may be painted: auto (estimated object, whole image for textures) "
                   "or none (whole image)")
    p.add_argument("--perlin-scales", metavar="MIN,MAX",
                   help="synthetic anomaly regions: Perlin lattice cells per axis from 2**MIN to 2**MAX (default "
                   "0,5; a smaller MAX gives larger, smoother regions)")
    p.add_argument("--anomaly-regions", choices=("all", "one"), default="all",
                   help="all: every region of the thresholded noise, a scatter of blobs (default); one: a single "
                   "connected region of it, one small isolated defect (parts whose defects are tiny cuts or holes)")
    p.add_argument("--anomaly-sources", metavar="LIST",
                   help="what synthetic anomalies are filled with, comma-separated: self (the image, altered "
                   "and shuffled), smudge (the image blurred and darkened or lightened, soft-edged: stains, "
                   "wear), blur (texture smoothed away, brightness kept), restyle (a foreign pattern at the "
                   "image's own mean and contrast), shade (large regions of the same texture a little darker or "
                   "lighter: uneven finish or light), procedural (generated textures); default "
                   "self,procedural,blur,restyle")
    p.add_argument("--texture-dir", help="optional folder of texture images as an extra anomaly source")
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes (default 1)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=250, help="steps between checkpoints")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 autocast only where the CPU (AVX512-BF16, AMX) or GPU computes bf16 "
                   "natively, fp32 elsewhere (emulated bf16 is 25-85x slower); the log says which it chose")
    p.add_argument("--no-bf16", dest="precision", action="store_const", const="fp32",
                   help="the same as --precision fp32")
    p.add_argument("--memory-format", choices=("auto", "channels_last", "contiguous"), default="auto",
                   help="the networks' memory layout, a speed choice (same values): auto (default) is "
                   "channels-last (NHWC) except bf16 on a CPU; `diffad bench training` times both here")
    p.add_argument("--crop", type=int, metavar="N",
                   help="train on random N-px crops of the input (a multiple of 16 for small; inference stays on "
                   "the whole image): more distinct samples per step for the same compute; default: the "
                   "preset's (small: 64 px, 4 per image) on a texture, whole images on a part against a plain "
                   "background (DiffusionAD; the log says which); 0: whole images")
    p.add_argument("--crops-per-image", type=_positive_int, metavar="K",
                   help="crops taken from each image per step, each with its own synthetic anomaly (default: the "
                   "preset's with its crop, else 1)")
    p.add_argument("--map-sigma", type=_sigma, metavar="SIGMA",
                   help="Gaussian smoothing of the anomaly map, in pixels at the input size, before the image score "
                   "(diffusionad only); default: chosen on the validation set among 0, half, once and twice the "
                   "preset's (at 128 px: 0, 1, 2, 4). Fix it when you know better than the synthetic anomalies: "
                   "large defects or coarse ground-truth masks favour more, defects of a few pixels less")
    p.add_argument("--ema-decay", type=float, default=0.995,
                   help="decay of the weights' moving average that is validated and kept (default 0.995; 0: off)")
    p.add_argument("--validation-fraction", type=float, default=0.1,
                   help="share of train/good held out (with synthetic anomalies) to choose the checkpoint and "
                   "t_s when the category has no validation/good (default 0.1; 0: none)")
    p.add_argument("--validate-every", type=_positive_int, default=100, help="steps between validations (default 100)")
    p.add_argument("--segmentation-input", choices=("pair", "difference"), default="pair",
                   help="what the segmentation network sees: pair (default, the paper's), the image and its "
                   "reconstruction; difference, only image - reconstruction, so the map must come from what the "
                   "reconstruction changed (diffusionad only)")
    p.add_argument("--no-standardize", action="store_true",
                   help="scale images to [-1, 1] instead of standardising them by the training images' mean and std")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the networks train")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in RUN_DIR")

    p = verbs.add_parser("evaluate", help="measure a model on a labelled test set and calibrate its threshold",
                         description="Image AUROC, pixel AUROC, AUPRO (up to 30% FPR), pixel AP and image "
                         "F1-max on DATA_DIR/test. Stores the calibrated threshold in RUN_DIR/calibration.json: "
                         "a quantile of scores on validation/good when present, else the F1-optimal one.")
    p.add_argument("model", metavar="RUN_DIR_OR_BUNDLE", help="a training run folder or a model file")
    p.add_argument("data_dir", metavar="DATA_DIR", nargs="+",
                   help="MVTec-layout category with test/ and ground_truth/; for a multi-category DeCo-Diff model, "
                   "several (each scored as the category its folder names; the mean is reported too)")
    p.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--calibration", choices=("auto", "f1", "quantile", "none"), default="auto")
    p.add_argument("--quantile", type=float, default=0.99, help="for quantile calibration (default 0.99)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the model runs (in fp32)")

    p = verbs.add_parser("export", help="write a model bundle (ONNX graph, optional TensorRT engine) from a run",
                         description=EXPORT_DESCRIPTION, epilog=EXPORT_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run folder (with model.safetensors)")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="folder for the bundle")
    p.add_argument("--name", help="the model's name in the bundle (default: RUN_DIR's folder name)")
    p.add_argument("--input-dtype", choices=("uint8", "float32"), default="uint8",
                   help="the graph's input: uint8 0..255 (default; the graph divides by 255) or float32 0..1")
    p.add_argument("--opset", type=int, help="ONNX opset, 18 or newer (default 18)")
    p.add_argument("--no-fp16-graph", dest="fp16_graph", action="store_false",
                   help="leave out model.fp16.onnx (the pipeline with both networks in fp16, checked against "
                   "the fp32 graph), from which TensorRT 11 builds fp16 engines; TensorRT 10 does not need it")
    p.add_argument("--mode", choices=("one-step", "d3ad", "d3ad-fixed"), default="one-step",
                   help="the reconstruction in the graph: one-step (default: norm-guided, 2 UNet passes); d3ad "
                   "(noise-free, input-guided 10-step DDIM from a noise level per image, chosen by its one-step "
                   "score among good held-out images': 12 UNet passes); d3ad-fixed (the same from the highest "
                   "level for every image: 10 passes). The d3ad modes calibrate their own threshold on good "
                   "images the run did not train on")
    p.add_argument("--good-images", metavar="DIR",
                   help="with --mode d3ad*: a folder of good images the run did not train on (default: the run's "
                   "held-out images, else the category's validation/good)")
    p.add_argument("--overwrite", action="store_true", help="replace BUNDLE_DIR if it exists")
    p.add_argument("--tensorrt", action="store_true",
                   help="also build a TensorRT engine for this GPU; without a GPU, the tensorrt package or "
                   "cuda-python the ONNX bundle is still written, with a warning (exit 0)")
    p.add_argument("--fp16", action="store_true", help="build the engine in fp16 (needs --tensorrt)")
    p.add_argument("--min-batch", type=_positive_int, help="engine profile: smallest batch (default 1)")
    p.add_argument("--opt-batch", type=_positive_int, help="engine profile: batch tuned for (default 8)")
    p.add_argument("--max-batch", type=_positive_int, help="engine profile: largest batch (default 32)")
    p.add_argument("--timing-cache", metavar="FILE",
                   help="TensorRT timing cache to read and update (default: one per GPU and TensorRT version "
                   "under ~/.cache/diffad/tensorrt)")

    p = verbs.add_parser("export-triton", help="write bundles into an NVIDIA Triton Inference Server model repository",
                         description=EXPORT_TRITON_DESCRIPTION, epilog=EXPORT_TRITON_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", metavar="BUNDLE_DIR", nargs="+", help="bundles made by `diffad export`")
    p.add_argument("--out", required=True, metavar="REPO", help="the model repository (created or added to)")
    p.add_argument("--max-batch-size", type=_positive_int, default=8,
                   help="largest batch Triton's dynamic batcher forms (default 8)")
    p.add_argument("--max-queue-delay-us", type=int, default=5000,
                   help="how long the oldest request may wait for a batch to fill, microseconds (default 5000)")
    p.add_argument("--max-queue-size", type=_positive_int, default=256,
                   help="requests queued per model before Triton refuses more (default 256)")
    p.add_argument("--instances", type=_positive_int, default=1, help="model instances per device (default 1)")
    p.add_argument("--kind", choices=("gpu", "cpu"), default="gpu",
                   help="where each instance runs: gpu (KIND_GPU, default) or cpu (KIND_CPU)")
    p.add_argument("--keep-versions", type=_positive_int, default=2,
                   help="versions Triton keeps loaded, the newest N (default 2: the old one serves while "
                   "clients move to the new one)")
    p.add_argument("--tensorrt", action="store_true",
                   help="serve the bundles' TensorRT engines (platform tensorrt_plan, one per compute capability) "
                   "instead of model.onnx with the onnxruntime backend")
    p.add_argument("--tensorrt-version", metavar="X.Y.Z",
                   help="with --tensorrt: only engines built with this TensorRT, the one in the Triton image")

    verbs.add_parser("presets", help="print each preset's parameter count and GMAC per image",
                     description="Parameters and multiply-accumulates per image of the one-step pipeline "
                     "(two UNet passes + segmentation) for each preset, at its default size, 3 channels.")
    _add_service_verbs(verbs)
    return parser


SERVE_EPILOG = """\
settings (environment, or a .env / DIFFAD_SETTINGS_FILE file; flags given here win):
  DIFFAD_MODELS DIFFAD_BACKEND DIFFAD_MAX_BATCH_SIZE DIFFAD_MAX_QUEUE_DELAY_MS DIFFAD_MAX_QUEUE_SIZE
  DIFFAD_REQUEST_TIMEOUT_S DIFFAD_MAX_UPLOAD_BYTES DIFFAD_MAX_IMAGE_PIXELS DIFFAD_THREADS DIFFAD_ENGINE_CACHE
  DIFFAD_TRITON_URL DIFFAD_TRITON_HEALTH_INTERVAL_S DIFFAD_HOST DIFFAD_PORT DIFFAD_LOG_LEVEL, and
  DIFFAD_API_KEYS (comma-separated; no flag, to keep keys out of the process list)

examples:
  diffad serve bundles/dagm --port 8000
  curl -F file=@part.png 'http://127.0.0.1:8000/inspect?map=none'
"""

ENGINES_EPILOG = """\
Engines run only on the GPU model and TensorRT version they were built with, so build them on the host
that serves. Each lands in DIR with a sidecar JSON (source model.onnx SHA-256, GPU, TensorRT version,
precision, batch profile, parity against ONNX Runtime); the service (DIFFAD_ENGINE_CACHE=DIR) uses an
engine only if all of them match. Bundles are only read, so they may be mounted read-only.

exit status: 0 built or already present, or nothing to build here (no GPU or no TensorRT: the service
uses ONNX Runtime); 1 a build or parity check failed; 2 bad arguments or a broken bundle.
"""


def _add_service_verbs(verbs) -> None:
    """`serve`, `engines` and `bench load|quality|speed`: the service, its engines and the benchmarks."""
    p = verbs.add_parser("serve", help="serve model bundles over HTTP (POST /inspect)",
                         description="Serve one or more model bundles: dynamic batching per model, Prometheus "
                         "metrics, readiness after warm-up, graceful shutdown on SIGTERM.", epilog=SERVE_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="*", metavar="BUNDLE_DIR", help="model bundles (default: DIFFAD_MODELS)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt", "torch", "triton"),
                   help="auto (default): a TensorRT engine for this GPU, else ONNX Runtime CUDA, else PyTorch "
                   "CUDA, else ONNX Runtime CPU; triton: the gateway, "
                   "batches run on Triton Inference Server at --triton-url")
    p.add_argument("--triton-url", metavar="URL",
                   help="with --backend triton: http://HOST:8000 or grpc://HOST:8001 (DIFFAD_TRITON_URL)")
    p.add_argument("--max-batch-size", type=_positive_int, help="largest dynamic batch (default 8)")
    p.add_argument("--max-queue-delay-ms", type=float, help="longest wait for a batch to fill (default 5)")
    p.add_argument("--max-queue-size", type=_positive_int, help="queued requests per model before 429 (default 256)")
    p.add_argument("--request-timeout-s", type=_positive_float, help="504 after this (default 30)")
    p.add_argument("--max-upload-bytes", type=_positive_int, help="413 above (default 20 MiB)")
    p.add_argument("--max-image-pixels", type=_positive_int, help="413 above width x height (default 50 M)")
    p.add_argument("--threads", type=_positive_int, help="backend intra-op threads (default: the backend's)")
    p.add_argument("--drain-grace-s", type=float, help="after SIGTERM, seconds of 503s before the port closes "
                   "(default 5)")
    p.add_argument("--engine-cache", metavar="DIR", help="TensorRT engines built by `diffad engines`")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), help="default info")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="text (default) or json: one JSON object per line with the request id, status and latencies")

    p = verbs.add_parser("engines", help="build TensorRT engines for this GPU into an engine cache",
                         description="Build, for this machine's GPU, the TensorRT engine each bundle lacks, "
                         "into a cache folder outside the bundles.", epilog=ENGINES_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+", metavar="BUNDLE_DIR")
    p.add_argument("--cache-dir", metavar="DIR", help="where engines go (default: DIFFAD_ENGINE_CACHE)")
    p.add_argument("--fp16", action="store_true", help="build fp16 engines (default fp32)")
    p.add_argument("--or-fp32", action="store_true",
                   help="with --fp16: build an fp32 engine, with a warning, for a bundle this TensorRT cannot build "
                        "fp16 from (TensorRT 11 and a bundle exported without model.fp16.onnx) instead of failing")
    p.add_argument("--min-batch", type=_positive_int, help="engine profile: smallest batch (default 1)")
    p.add_argument("--opt-batch", type=_positive_int, help="engine profile: batch tuned for (default 8)")
    p.add_argument("--max-batch", type=_positive_int, help="engine profile: largest batch (default 32)")

    p = verbs.add_parser("bench", help="benchmarks that print one JSON object",
                         description="Benchmarks; each prints one JSON object.")
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    from .benchmarks.load import add_arguments as add_load_arguments

    add_load_arguments(benches.add_parser(
        "load", help="the service under many concurrent clients, with and without dynamic batching",
        description="Start `diffad serve` on the bundle (once with dynamic batching, once without) and drive "
        "it with concurrent HTTP clients from this process; report throughput and latency percentiles next "
        "to the bare backend's throughput at the same batch sizes."))
    from .benchmarks.overload import add_arguments as add_overload_arguments

    add_overload_arguments(benches.add_parser(
        "overload", help="the service past its capacity, with large images, and stopped under load",
        description="On fresh `diffad serve` subprocesses: measure capacity, then send requests at 1x, 2x and "
        "5x of it regardless of answers; report goodput, 429 and 504 counts and latencies, images computed "
        "but never answered and peak resident memory; then large images, then SIGTERM under load (answered, "
        "refused with 503, lost)."))
    from .benchmarks.quality import add_arguments as add_quality_arguments

    add_quality_arguments(benches.add_parser(
        "quality", help="train, evaluate and record each category and seed (one JSON each in --out-dir)",
        description="For each MVTec-layout DATASET and each seed of --seeds: train with the preset and time "
        "budget into RUNS_DIR/<dataset>_<preset>_seed<S>, evaluate on its test set and write "
        "OUT_DIR/<dataset>_<preset>_seed<S>.json (a run whose file exists is skipped, so a rerun resumes); "
        "print every record, each setting's mean and std over its seeds and the Markdown table that "
        "`bench/render_results.py table` puts in the README, as one JSON object."))
    from .benchmarks.training_speed import add_arguments as add_training_arguments

    add_training_arguments(benches.add_parser(
        "training", help="seconds per training step on this machine, NCHW against channels-last",
        description="Time the training steps `diffad train` would run on DATA_DIR's images (same preset, crops, "
        "precision and synthetic anomalies) for two copies of one model, default NCHW and channels-last "
        "layout, interleaved step by step; report seconds per step, their ratio and the steps a time "
        "budget buys, with the CPU and its flags."))
    from .benchmarks.speed import add_arguments as add_speed_arguments

    add_speed_arguments(benches.add_parser(
        "speed", help="one-step vs DDIM vs ancestral, ONNX Runtime vs PyTorch, FLOP/s, service memory",
        description="In one process, on the same model and images: (a) time per image and detection metrics of "
        "one-step, DDIM (10, 50 steps) and ancestral reconstruction on a stratified test subset; (b) ONNX "
        "Runtime against PyTorch eager images/s; (c) achieved FLOP/s against a measured float32 matrix "
        "product; (d) peak resident memory of `diffad serve` with this model."))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.verb == "train":
            return _train(args)
        if args.verb == "evaluate":
            return _evaluate(args)
        if args.verb == "export":
            return _export(args)
        if args.verb == "export-triton":
            return _export_triton(args)
        if args.verb == "presets":
            return _presets()
        if args.verb == "serve":
            return _serve(args)
        if args.verb == "engines":
            return _engines(args)
        if args.verb == "bench":
            import shlex

            from .benchmarks import load, overload, quality, speed, training_speed

            args.command = shlex.join(["diffad", *(sys.argv[1:] if argv is None else argv)])  # for the records
            return {"load": load.run, "overload": overload.run, "quality": quality.run,
                    "speed": speed.run, "training": training_speed.run}[args.bench](args)
    except ValueError as e:  # DataError, CheckpointError, BundleError and bad settings are ValueErrors
        print(f"diffad {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 1


def _train(args) -> int:
    import dataclasses

    from .training.synthesis import SynthesisConfig, parse_perlin_scales, parse_sources
    from .training.trainer import LEARNING_RATES, TrainConfig, crop_setting, train, training_device

    if args.max_steps is None and args.max_minutes is None:
        raise ValueError("give a budget: --max-steps, --max-minutes or both")
    if args.crop is not None and args.crop < 0:
        raise ValueError(f"--crop must be 0 (whole images) or a positive size, got {args.crop}")
    crop, crops_per_image, whole_images_for_objects = crop_setting(args.preset, args.crop, args.crops_per_image)
    unet_lr, seg_lr = LEARNING_RATES[args.preset]
    cfg = TrainConfig(
        batch_size=args.batch_size, unet_lr=args.unet_lr or unet_lr, segmentation_lr=args.seg_lr or seg_lr,
        max_steps=args.max_steps, max_minutes=args.max_minutes, seed=args.seed, workers=args.workers,
        lr_schedule=args.lr_schedule, checkpoint_every=args.checkpoint_every, precision=args.precision,
        memory_format=args.memory_format,
        device=training_device(args.device), crop=crop, crops_per_image=crops_per_image,
        whole_images_for_objects=whole_images_for_objects, ema_decay=args.ema_decay,
        validation_fraction=args.validation_fraction, validate_every=args.validate_every,
        standardize=not args.no_standardize, segmentation_input=args.segmentation_input,
        map_sigma_candidates=None if args.map_sigma is None else (args.map_sigma,),
        synthesis=dataclasses.replace(SynthesisConfig(), foreground=args.foreground, texture_dir=args.texture_dir,
                                      sources=parse_sources(args.anomaly_sources), regions=args.anomaly_regions,
                                      **parse_perlin_scales(args.perlin_scales)),
    )
    if args.method == "decodiff":
        from .training.decodiff import train_decodiff

        if args.resume:
            raise ValueError("--resume is not supported with --method decodiff yet")
        if args.segmentation_input != "pair":
            raise ValueError("--segmentation-input is DiffusionAD's: DeCo-Diff has no segmentation network")
        if args.map_sigma is not None:
            raise ValueError("--map-sigma is DiffusionAD's: DeCo-Diff's map keeps the paper's blur")
        summary = train_decodiff(args.data_dir, args.out, args.preset, args.image_size, args.channels, cfg)
        print(json.dumps(summary, indent=2))
        return 0
    if len(args.data_dir) != 1:
        raise ValueError("DiffusionAD trains on one category; several folders need --method decodiff")
    summary = train(args.data_dir[0], args.out, args.preset, args.image_size, args.channels, cfg,
                    resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0


def _evaluate(args) -> int:
    from .evaluation.evaluate import evaluate_run

    if len(args.data_dir) > 1:
        from .evaluation.evaluate import evaluate_categories

        result = evaluate_categories(args.model, args.data_dir, args.json, args.batch_size, args.calibration,
                                     args.quantile, device=args.device)
    else:
        result = evaluate_run(args.model, args.data_dir[0], args.json, args.batch_size, args.calibration,
                              args.quantile, device=args.device)
    print(json.dumps(result, indent=2))
    return 0


def _export(args) -> int:
    from .export.exporter import ExportOptions, ParityError, export_bundle
    from .export.tensorrt_engine import EngineBuildError, EngineOptions

    engine_args = {"min_batch": args.min_batch, "opt_batch": args.opt_batch, "max_batch": args.max_batch,
                   "fp16": args.fp16 or None, "timing_cache": args.timing_cache}
    given = {k: v for k, v in engine_args.items() if v is not None}
    if given and not args.tensorrt:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags} {'needs' if len(given) == 1 else 'need'} --tensorrt")
    engine = EngineOptions.from_partial(**given) if args.tensorrt else None  # checked before the export
    options = ExportOptions(input_dtype=args.input_dtype, name=args.name, overwrite=args.overwrite,
                            tensorrt=engine, fp16_graph=args.fp16_graph, mode=args.mode, good_images=args.good_images,
                            **({"opset": args.opset} if args.opset is not None else {}))
    try:
        manifest = export_bundle(args.run_dir, args.out, options)
    except (ParityError, EngineBuildError) as e:
        print(f"diffad export: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({
        "bundle": args.out, "name": manifest["name"], "files": sorted(manifest["files"]),
        "input": manifest["input"], "threshold": manifest["threshold"],
        "onnx": {k: manifest["onnx"][k] for k in ("opset", "exporter", "optimization", "parity")},
        "engines": [{k: e[k] for k in ("file", "gpu", "tensorrt_version", "precision", "parity")}
                    for e in manifest["engines"]],
    }, indent=2))
    return 0


def _export_triton(args) -> int:
    from .export.triton import TritonOptions, export_repository

    options = TritonOptions(max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                            max_queue_size=args.max_queue_size, instances=args.instances, kind=args.kind,
                            keep_versions=args.keep_versions, tensorrt=args.tensorrt,
                            tensorrt_version=args.tensorrt_version)
    print(json.dumps({"repository": args.out, "models": export_repository(args.bundles, args.out, options)},
                     indent=2))
    return 0


def _presets() -> int:
    from .models.diffusionad import DiffusionAD
    from .models.presets import PRESET_NAMES, describe, preset

    rows = []
    for name in PRESET_NAMES:
        cfg = preset(name)
        rows.append({"preset": name, "image_size": cfg.image_size, **describe(DiffusionAD(cfg))})
    print(json.dumps(rows, indent=2))
    return 0


def _serve(args) -> int:
    from .service.server import serve
    from .service.settings import load_settings

    flags = {name: getattr(args, name) for name in (
        "host", "port", "backend", "max_batch_size", "max_queue_delay_ms", "max_queue_size", "request_timeout_s",
        "max_upload_bytes", "max_image_pixels", "threads", "drain_grace_s", "engine_cache", "log_level",
        "log_format", "triton_url")}
    settings = load_settings(models=args.bundles or None, **flags)
    serve(settings)
    return 0


def _engines(args) -> int:
    import dataclasses
    import os

    from .export.bundle import load_bundle
    from .export.tensorrt_engine import (
        EngineBuildError,
        EngineOptions,
        FP16GraphMissing,
        TensorRTUnavailable,
        build_cached_engine,
        join_words,
        missing_for_tensorrt,
    )

    cache_dir = args.cache_dir or os.environ.get("DIFFAD_ENGINE_CACHE")
    if not cache_dir:
        raise ValueError("give --cache-dir DIR (or set DIFFAD_ENGINE_CACHE)")
    options = EngineOptions.from_partial(min_batch=args.min_batch, opt_batch=args.opt_batch,
                                         max_batch=args.max_batch, fp16=args.fp16)
    for bundle_dir in args.bundles:  # a typo or a broken bundle is reported on any machine
        load_bundle(bundle_dir)
    missing = missing_for_tensorrt()
    if missing:
        print(f"diffad engines: nothing to build: this machine lacks {join_words(missing)}, so no TensorRT "
              "engine can be built or run here; the service will use ONNX Runtime for these bundles")
        return 0
    results = []
    for bundle_dir in args.bundles:
        try:
            try:
                results.append(build_cached_engine(bundle_dir, cache_dir, options))
            except FP16GraphMissing as e:
                if not args.or_fp32:
                    raise
                print(f"diffad engines: warning: {bundle_dir}: {e}. Building an fp32 engine instead (--or-fp32).",
                      file=sys.stderr)
                results.append(build_cached_engine(bundle_dir, cache_dir, dataclasses.replace(options, fp16=False)))
        except (EngineBuildError, TensorRTUnavailable) as e:
            print(f"diffad engines: error: {bundle_dir}: {e}", file=sys.stderr)
            return 1
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

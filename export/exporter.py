"""`diffad export`: a training run in, a checked model bundle out.

1. load RUN_DIR/model.safetensors and export the one-step pipeline to ONNX (onnx_export.py);
2. check ONNX Runtime against PyTorch at batch 1 and 8 on generated images (parity.py); export the same
   pipeline with both networks in fp16 (model.fp16.onnx, what TensorRT 11 builds fp16 engines from) and
   check it against the fp32 graph within the fp16 bounds;
3. write bundle.json: interface, method constants, calibrated threshold and score scale, training and
   validation summaries, parity figures, file hashes (bundle.py);
4. with TensorRT requested and possible here, build and check an engine for this GPU (tensorrt_engine.py).

Everything is written into a staging folder beside BUNDLE_DIR and moved into place only once every check
has passed, so BUNDLE_DIR never holds a half-written or unchecked bundle: on a failed check nothing is
written. A machine that cannot build TensorRT engines (no tensorrt package, no cuda-python, no GPU) still
gets a complete ONNX bundle, with one warning line that says what it lacks; engines are built where they
run, with the same command or `tensorrt_engine.add_engine`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..evaluation.d3ad import EXPORT_MODES, calibrate_d3ad, good_images_for, read_good_images
from ..evaluation.evaluate import Calibration, load_calibration
from ..models import checkpoint as ckpt
from ..models.map_reference import STD_FLOOR
from .bundle import (
    CATEGORY_INPUT,
    INPUT_DTYPES,
    ONNX_FILE,
    ONNX_FP16_FILE,
    SCHEMA_VERSION,
    WEIGHTS_FILE,
    describe_input,
    describe_outputs,
    load_bundle,
    normalization_from_calibration,
    seal_bundle,
)
from .onnx_export import DEFAULT_OPSET, MIN_OPSET, export_onnx
from .parity import (
    TENSORRT_TOLERANCES,
    as_graph_input,
    compare,
    log_report,
    onnx_vs_torch,
    onnxruntime_runner,
    parity_images,
    run_in_batches,
)
from .tensorrt_engine import EngineOptions, add_engine, join_words, missing_for_tensorrt

log = logging.getLogger("diffad.export")

TRAIN_SUMMARY_FILE = "train_summary.json"
EVAL_FILE = "eval.json"


class ParityError(RuntimeError):
    """The exported graph does not compute what the PyTorch model computes."""


@dataclass(frozen=True)
class ExportOptions:
    input_dtype: str = "uint8"
    opset: int = DEFAULT_OPSET
    name: str | None = None                  # the model's name in the bundle; default: RUN_DIR's name
    overwrite: bool = False                  # replace an existing BUNDLE_DIR
    tensorrt: EngineOptions | None = None    # also build a TensorRT engine (where possible)
    parity_batch_sizes: tuple[int, ...] = (1, 8)
    fp16_graph: bool = True                  # also write model.fp16.onnx (TensorRT 11 builds fp16 from it)
    mode: str = "one-step"                   # the reconstruction in the graph: one-step, d3ad or d3ad-fixed
    good_images: str | None = None           # d3ad: good images the run did not train on (default: its held-out)

    def __post_init__(self):  # fail before the slow part
        if self.input_dtype not in INPUT_DTYPES:
            raise ValueError(f"input dtype must be one of {', '.join(INPUT_DTYPES)}, got {self.input_dtype!r}")
        if self.opset < MIN_OPSET:
            raise ValueError(f"opset must be at least {MIN_OPSET}, got {self.opset}")
        if self.mode not in EXPORT_MODES:
            raise ValueError(f"mode must be one of {', '.join(EXPORT_MODES)}, got {self.mode!r}")


def export_bundle(run_dir: str | Path, out_dir: str | Path, options: ExportOptions = ExportOptions()) -> dict:
    """Export RUN_DIR into the bundle folder out_dir; returns bundle.json's content as written."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder not found: {run_dir} (give the folder `diffad train --out` wrote)")
    if out_dir.exists() and not options.overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} already exists and is not empty; pass --overwrite to replace it")
    if out_dir.resolve() == run_dir.resolve():
        raise ValueError("the bundle folder must differ from the run folder")
    model = ckpt.load_model(run_dir)  # CheckpointError names the file when it is missing or broken
    if getattr(model.config, "method", "diffusionad") == "decodiff":
        return export_decodiff_bundle(model, run_dir, out_dir, options)
    calibration = None  # None: the run's calibration.json
    if EXPORT_MODES[options.mode] != "off":
        good = good_images_for(run_dir, options.good_images)
        _, calibration = calibrate_d3ad(model, read_good_images(good, model), EXPORT_MODES[options.mode])

    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        onnx_info = export_onnx(model, staging / ONNX_FILE, options.input_dtype, options.opset)
        if calibration is None:
            shutil.copyfile(run_dir / ckpt.MODEL_FILE, staging / WEIGHTS_FILE)
        else:  # the weights with the configuration the graph was made from (its D3AD mode and bins)
            metadata = ckpt.read_metadata(run_dir / ckpt.MODEL_FILE)
            ckpt.save_model(staging / WEIGHTS_FILE, model, {k: v for k, v in metadata.items() if k != "config"})

        cfg = model.config
        images = parity_images(cfg.image_size, cfg.in_channels, count=max(options.parity_batch_sizes))
        parity = onnx_vs_torch(model, staging / ONNX_FILE, options.input_dtype, images, options.parity_batch_sizes)
        if not parity["passed"]:
            raise ParityError("the ONNX graph does not match the PyTorch model: " + "; ".join(parity["failures"])
                              + f". No bundle was written to {out_dir}")

        manifest = build_manifest(model, run_dir, options, {**onnx_info.to_dict(), "parity": parity}, calibration)
        if options.fp16_graph:
            manifest["onnx_fp16"] = export_fp16_graph(model, staging, options, images)
        seal_bundle(staging, manifest)
        if options.tensorrt is not None:
            missing = missing_for_tensorrt()
            if missing:
                log.warning("--tensorrt: no engine built, this machine lacks %s; the bundle holds the ONNX "
                            "model only (build engines on the GPU host)", join_words(missing))
            else:
                add_engine(staging, options.tensorrt)
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    bundle = load_bundle(out_dir)  # verify what landed, hashes included
    log.info("bundle written to %s (%s)", out_dir, ", ".join(bundle.manifest["files"]))
    return bundle.manifest


CATEGORY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def export_decodiff_bundle(model, run_dir: Path, out_dir: Path, options: ExportOptions) -> dict:
    """A DeCo-Diff run's bundle: the whole deterministic correction (its UNet calls unrolled) as one graph,
    model.onnx, checked for parity and batch independence. One category: the category is a constant of the
    graph, as DiffusionAD's bundle. Several: the graph takes each image's category index as a second input
    (one set of weights for all, batches may mix them), and bundle.json's `models` gives each category its
    name <bundle>.<category>, its index and its calibrated threshold."""
    if options.mode != "one-step":
        raise ValueError(f"--mode {options.mode} is a DiffusionAD reconstruction; a DeCo-Diff run exports its "
                         "own correction (leave --mode out)")
    if options.tensorrt is not None:
        raise ValueError("TensorRT engines for DeCo-Diff bundles are not built yet: export without --tensorrt "
                         "(the bundle serves on ONNX Runtime, CPU or CUDA)")
    if options.fp16_graph:
        log.info("no model.fp16.onnx for DeCo-Diff: the fp16 graph serves TensorRT 11's fp16 engines, which "
                 "DeCo-Diff bundles do not have yet")
    cfg = model.config
    categories = list(cfg.categories)
    for category in categories:
        if not CATEGORY_NAME.fullmatch(category):
            raise ValueError(f"category {category!r} cannot name a served model (letters, digits, '_', '.', '-'): "
                             "rename its folder and train again")
    name = options.name or run_dir.resolve().name
    several = len(categories) > 1
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        count = max(options.parity_batch_sizes)
        images = parity_images(cfg.image_size, cfg.in_channels, count=count)
        # several categories: every batch of the parity check mixes them, so a graph that mixed up the
        # images' categories (or let one image's category reach another's result) would fail it
        indices = np.arange(count, dtype=np.int64) % len(categories) if several else None
        model.set_category(categories[0])
        onnx_info = export_onnx(model, staging / ONNX_FILE, options.input_dtype, options.opset,
                                category_input=several)
        parity = onnx_vs_torch(model, staging / ONNX_FILE, options.input_dtype, images, options.parity_batch_sizes,
                               categories=indices)
        if not parity["passed"]:
            raise ParityError("the ONNX graph does not match the PyTorch model: " + "; ".join(parity["failures"])
                              + f". No bundle was written to {out_dir}")
        graphs = []
        for index, category in enumerate(categories):
            calibration = load_calibration(run_dir, category if several else None)
            if calibration is None:
                log.warning("%s has no calibration for %s: its threshold is null; run `diffad evaluate %s "
                            "DATA_DIR...` first, then export again", run_dir, category, run_dir)
            cal = None if calibration is None else calibration.to_dict()
            graphs.append({"name": f"{name}.{category}" if several else name, "category": category,
                           "category_index": index, "threshold": None if cal is None else float(cal["threshold"]),
                           "score_normalization": normalization_from_calibration(cal)})
        shutil.copyfile(run_dir / ckpt.MODEL_FILE, staging / WEIGHTS_FILE)
        first = graphs[0]
        onnx_block = {**onnx_info.to_dict(), "parity": parity}
        if several:
            onnx_block["category_input"] = CATEGORY_INPUT
        manifest = {
            **_common_manifest(model, run_dir, options, name),
            "method": "decodiff",
            "outputs": describe_score_outputs(cfg),
            "correction": {"num_steps": cfg.num_steps, "timesteps": cfg.timesteps, "schedule": "cosine"},
            "score": {"top_k": cfg.top_k, "map_reference": cfg.score_reference},
            "categories": categories,
            "category": first["category"],
            "category_index": 0,
            "threshold": first["threshold"],
            "score_normalization": first["score_normalization"],
            "onnx": onnx_block,
            "models": graphs if several else [],
        }
        if several:
            manifest["input"] = {**manifest["input"], "category": {
                "name": CATEGORY_INPUT, "dtype": "int64", "shape": ["batch"],
                "meaning": "each image's index into `categories`; every entry of `models` feeds its own"}}
        seal_bundle(staging, manifest)
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    bundle = load_bundle(out_dir)
    log.info("bundle written to %s: %s", out_dir, ", ".join(m.name for m in bundle.models()))
    return bundle.manifest


def export_fp16_graph(model, staging: Path, options: ExportOptions, images) -> dict:
    """model.fp16.onnx, checked in ONNX Runtime against the fp32 graph within the fp16 engine bounds."""
    info = export_onnx(model, staging / ONNX_FP16_FILE, options.input_dtype, options.opset, network_dtype="float16")
    graph_images = as_graph_input(images, options.input_dtype)
    reference = run_in_batches(onnxruntime_runner(staging / ONNX_FILE), graph_images, 8, whole_batches_only=False)
    parity = compare(reference, onnxruntime_runner(info.path), graph_images, options.parity_batch_sizes,
                     TENSORRT_TOLERANCES["fp16"], "onnxruntime CPUExecutionProvider, model.onnx (fp32)",
                     f"onnxruntime CPUExecutionProvider, {ONNX_FP16_FILE}")
    log_report(parity)
    if not parity["passed"]:
        raise ParityError(f"{ONNX_FP16_FILE} (networks in fp16) strays from the fp32 graph: "
                          + "; ".join(parity["failures"]) + ". Export with --no-fp16-graph to leave it out "
                          "(fp16 TensorRT engines then need TensorRT 10)")
    return {**info.to_dict(), "parity": parity}


def build_manifest(model, run_dir: Path, options: ExportOptions, onnx_block: dict,
                   calibration: Calibration | None = None) -> dict:
    """bundle.json's content, less the file hashes (seal_bundle adds them). `calibration`: the threshold
    when it is not the run's calibration.json (a D3AD export calibrates its own scores)."""
    cfg = model.config
    calibration = calibration or load_calibration(run_dir)
    if calibration is None:
        log.warning("%s has no calibration.json: the bundle's threshold is null and scores cannot be "
                    "normalised; run `diffad evaluate %s DATA_DIR` first, then export again", run_dir, run_dir)
    return {
        **_common_manifest(model, run_dir, options, options.name or run_dir.resolve().name),
        "method": "diffusionad",
        "outputs": describe_score_outputs(cfg),
        "t_s": cfg.t_s,
        "t_l": cfg.t_l,
        "w": cfg.w,
        "noise_seed": cfg.noise_seed,
        "top_k": cfg.top_k,
        "score": {"top_k": cfg.top_k, "map_reference": cfg.score_reference},
        "map_sigma": cfg.map_sigma,
        "reconstruction": {"mode": options.mode, **({} if cfg.d3ad.mode == "off" else {"d3ad": asdict(cfg.d3ad)})},
        "threshold": None if calibration is None else float(calibration.threshold),
        "score_normalization": normalization_from_calibration(None if calibration is None else calibration.to_dict()),
        "onnx": onnx_block,
    }


def _common_manifest(model, run_dir: Path, options: ExportOptions, name: str) -> dict:
    """What every bundle.json says, whatever the method."""
    cfg = model.config
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "preset": cfg.name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "diffad_version": __version__,
        "input": describe_input(cfg.image_size, cfg.in_channels, options.input_dtype),
        "input_standardization": {"mean": list(cfg.input_mean), "std": list(cfg.input_std),
                                  "formula": "(image / 255 - mean) / std per channel, inside the graph"},
        "training": _training_summary(run_dir),
        "validation": _read_json(run_dir / EVAL_FILE),
        "engines": [],
        "model_config": cfg.to_dict(),
    }


def _training_summary(run_dir: Path) -> dict | None:
    """train_summary.json, or the copy `diffad train` stores in the model file's metadata."""
    summary = _read_json(run_dir / TRAIN_SUMMARY_FILE)
    if summary is None:
        stored = ckpt.read_metadata(run_dir / ckpt.MODEL_FILE).get("training")
        summary = json.loads(stored) if stored else None
    return summary


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Replace out_dir by staging with two renames (the old bundle goes only once the new one is there)."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def describe_score_outputs(cfg) -> dict:
    """bundle.json's outputs, the score's rule in words."""
    return describe_outputs(cfg.image_size, f"raw image score: {score_rule(cfg)}; compare with threshold")


def score_rule(cfg) -> str:
    """A model's image score in words (bundle.json), either method."""
    if not cfg.score_reference:
        if cfg.top_k == 1:
            return "the map's maximum"
        return f"the mean of the map's top {cfg.top_k} values"
    top = "the maximum of z" if cfg.top_k == 1 else f"the mean of the top {cfg.top_k} values of z"
    return (f"{top}, squashed into (0, 1); z = (map - mean) / (std + {STD_FLOOR:g}) per pixel, mean and std of good "
            "training images' maps")

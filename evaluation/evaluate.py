"""Evaluation on a labelled test set and threshold calibration.

Maps are computed at the model's resolution and masks are read at that same resolution (binary: > 0),
so every metric compares like with like. The calibrated threshold is on the raw image score.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..models import checkpoint as ckpt
from ..models.d3ad import D3ADConfig
from ..models.diffusionad import DiffusionAD
from ..training.data import find_test_samples, find_validation_images, read_image, read_mask
from .metrics import compute_metrics, per_defect_type, threshold_from_f1, threshold_from_quantile

log = logging.getLogger("diffad.evaluate")

CALIBRATION_FILE = "calibration.json"


@dataclass
class Calibration:
    """Threshold on the raw score and the normalisation that maps it to 0.5 on a 0..1 scale."""

    threshold: float
    method: str               # "f1" (labelled test data) or "quantile" (good validation images)
    score_min: float
    score_max: float
    num_images: int

    def normalize(self, score: float | np.ndarray) -> float | np.ndarray:
        """0.5 at the threshold, scaled by the observed score range, clipped to [0, 1]."""
        span = max(self.score_max - self.score_min, 1e-12)
        return np.clip(0.5 + (np.asarray(score) - self.threshold) / span, 0.0, 1.0)

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "method": self.method, "score_min": self.score_min,
                "score_max": self.score_max, "num_images": self.num_images,
                "normalization": "clip(0.5 + (score - threshold) / (score_max - score_min), 0, 1)"}


Reconstruction = Callable[[torch.Tensor], torch.Tensor]


def reconstruction_method(model: DiffusionAD, method: str, steps: int | None = None,
                          d3ad: D3ADConfig | None = None) -> Reconstruction | None:
    """A reconstruction of x (normalised) by name: "one-step" (None: the model's own forward, norm-guided),
    "ddim" (DDIM from t_s in `steps` UNet passes), "ancestral" (DDPM from t_s, t_s + 1 passes) or "d3ad"
    (D3AD's guided DDIM with the settings `d3ad`, models/d3ad.py)."""
    if method == "one-step":
        return None
    if method == "d3ad":
        if d3ad is None or d3ad.mode == "off":
            raise ValueError("the d3ad reconstruction needs D3AD settings with mode fixed or dynamic")
        return lambda x: model.reconstruct_d3ad(x, d3ad)
    if method == "ddim":
        if not steps or steps < 1:
            raise ValueError(f"DDIM needs a positive number of steps, got {steps}")
        return lambda x: model.reconstruct_ddim(x, steps)
    if method == "ancestral":
        return model.reconstruct_ancestral
    raise ValueError(f"unknown reconstruction {method!r}: use one-step, ddim or ancestral")


def pipeline(model: DiffusionAD, images: torch.Tensor, reconstruct: Reconstruction | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffusionAD.forward with another reconstruction: the same segmentation, sigmoid and top-k score.

    images [N, C, H, W] in [0, 1]; reconstruct maps x (normalised, model.normalize) to its reconstruction
    in the same units (None: the norm-guided one-step rule, i.e. exactly model(images)).
    """
    if reconstruct is None:
        return model(images)
    x = model.normalize(images)
    anomaly_map = model.anomaly_map(x, reconstruct(x))
    return anomaly_map, model.score(anomaly_map)


@torch.inference_mode()
def predict(model: DiffusionAD, images: np.ndarray, batch_size: int = 8, desc: str = "inference",
            progress: bool = True, reconstruct: Reconstruction | None = None) -> tuple[np.ndarray, np.ndarray]:
    """images [N, H, W, C] in [0, 1] -> maps [N, H, W] and scores [N].

    One-step norm-guided by default; `reconstruct` swaps in another reconstruction (see `pipeline`).
    """
    model.eval()
    maps, scores = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size].transpose(0, 3, 1, 2)))
        anomaly_map, score = pipeline(model, batch.to(next(model.parameters()).device), reconstruct)
        maps.append(anomaly_map[:, 0].float().cpu().numpy())
        scores.append(score.float().cpu().numpy())
    return np.concatenate(maps), np.concatenate(scores)


@dataclass
class LabelledImages:
    samples: list            # training.data.TestSample, in order
    images: np.ndarray       # [N, H, W, C] in [0, 1] at the model's size
    masks: np.ndarray        # [N, H, W] binary
    labels: np.ndarray       # [N] 1 = anomalous


def read_test_set(data_dir: str | Path, size: int, channels: int, progress: bool = True) -> LabelledImages:
    """DATA_DIR/test with its ground truth, at the model's resolution."""
    samples = find_test_samples(data_dir)
    images = np.stack([read_image(s.path, size, channels) for s in
                       tqdm(samples, desc="reading test set", unit="img", leave=False, disable=not progress)])
    masks = np.stack([read_mask(s.mask_path, size) if s.mask_path else np.zeros((size, size), np.float32)
                      for s in samples])
    return LabelledImages(samples, images, masks, np.array([s.label for s in samples]))


def evaluate(model: DiffusionAD, data_dir: str | Path, batch_size: int = 8, calibration: str = "auto",
             quantile: float = 0.99, progress: bool = True, held_out: list[Path] | None = None
             ) -> tuple[dict, Calibration | None]:
    """The five metrics on data_dir's test set, and a calibrated threshold.

    calibration: "auto" takes a quantile of good images' scores that training never saw: validation/good
    when the category has it, else the images the run held out of train/good (`held_out`); only without
    either, the F1-optimal threshold on the test set (which looks at test labels: a warning says so).
    "f1", "quantile" force one; "none" skips it.
    """
    cfg = model.config
    size, channels = cfg.image_size, cfg.in_channels
    test = read_test_set(data_dir, size, channels, progress)
    samples, images, masks, labels = test.samples, test.images, test.masks, test.labels

    started = time.monotonic()
    maps, scores = predict(model, images, batch_size, "evaluating", progress)
    seconds = time.monotonic() - started
    metrics = compute_metrics(labels, scores, masks, maps)
    metrics.update({
        "per_defect_type": per_defect_type(labels, scores, masks, maps, [s.defect_type for s in samples]),
        "num_test_images": len(samples),
        "num_anomalous": int(labels.sum()),
        "defect_types": sorted({s.defect_type for s in samples} - {"good"}),
        "inference_images_per_s": round(len(samples) / seconds, 2),
    })

    validation = find_validation_images(data_dir) or [Path(p) for p in held_out or [] if Path(p).is_file()]
    method = calibration if calibration != "auto" else ("quantile" if validation else "f1")
    if method == "f1":
        log.warning("threshold from the test set's labels (F1-optimal): no good images were kept out of "
                    "training (validation/good, or a run's held-out images)")
    result = None
    if method == "quantile":
        if not validation:
            raise ValueError(f"quantile calibration needs good images in {Path(data_dir) / 'validation' / 'good'} "
                             "or images a run held out of training")
        val_images = np.stack([read_image(p, size, channels) for p in validation])
        _, val_scores = predict(model, val_images, batch_size, "calibrating", progress)
        result = Calibration(threshold_from_quantile(val_scores, quantile), f"quantile {quantile}",
                             float(min(val_scores.min(), scores.min())), float(scores.max()), len(validation))
    elif method == "f1":
        result = Calibration(threshold_from_f1(labels, scores), "f1", float(scores.min()), float(scores.max()),
                             len(samples))
    elif method != "none":
        raise ValueError(f"unknown calibration {calibration!r}: use auto, f1, quantile or none")
    if result is not None:
        predicted = scores >= result.threshold
        metrics["calibrated_threshold"] = result.threshold
        metrics["calibrated_accuracy"] = float((predicted == labels.astype(bool)).mean())
    return metrics, result


def evaluate_run(path: str | Path, data_dir: str | Path, json_path: str | Path | None = None,
                 batch_size: int = 8, calibration: str = "auto", quantile: float = 0.99,
                 progress: bool = True, device: str = "cpu") -> dict:
    """Evaluate a run folder (or model file) in fp32 on `device`, store its calibration beside it, write the
    JSON."""
    path = Path(path)
    # evaluation is fp32: channels-last, the faster layout (same values; diffad.hardware.convolution_layout)
    model = ckpt.load_model(path).to(device, memory_format=torch.channels_last)
    run_dir = path if path.is_dir() else path.parent
    run_config = json.loads((run_dir / ckpt.CONFIG_FILE).read_text()) if (run_dir / ckpt.CONFIG_FILE).is_file() else {}
    held_out, calibration_file = run_config.get("held_out_images"), CALIBRATION_FILE
    categories = getattr(model.config, "categories", ())
    if len(categories) > 1:  # a multi-category DeCo-Diff model: the folder's name says which category it is
        category = Path(data_dir).resolve().name
        model.set_category(category)
        held_out = run_config.get("held_out_images_by_category", {}).get(category)
        calibration_file = category_calibration_file(category)
    metrics, cal = evaluate(model, data_dir, batch_size, calibration, quantile, progress, held_out)
    if cal is not None:
        (run_dir / calibration_file).write_text(json.dumps(cal.to_dict(), indent=2))
        log.info("threshold %.4f (%s) saved to %s", cal.threshold, cal.method, run_dir / calibration_file)
    result = {"model": str(path), "data_dir": str(data_dir), "preset": model.config.name,
              "method": getattr(model.config, "method", "diffusionad"), **metrics}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def category_calibration_file(category: str) -> str:
    """A multi-category model's threshold for one category (each has its own score distribution)."""
    return f"calibration.{category}.json"


SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1_max")


def evaluate_categories(path: str | Path, data_dirs: list[str | Path], json_path: str | Path | None = None,
                        batch_size: int = 8, calibration: str = "auto", quantile: float = 0.99,
                        progress: bool = True, device: str = "cpu") -> dict:
    """A multi-category model on each category's test set (evaluate_run each), and the metrics' mean."""
    per_category = {Path(d).resolve().name: evaluate_run(path, d, None, batch_size, calibration, quantile, progress,
                                                         device)
                    for d in data_dirs}
    mean = {k: float(np.mean([r[k] for r in per_category.values()])) for k in SUMMARY_METRICS
            if all(k in r for r in per_category.values())}
    result = {"model": str(path), "categories": per_category, "mean": mean}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def load_calibration(run_dir: str | Path, category: str | None = None) -> Calibration | None:
    """The run's calibration.json, or with `category` a multi-category model's calibration.<category>.json."""
    path = Path(run_dir) / (CALIBRATION_FILE if category is None else category_calibration_file(category))
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return Calibration(d["threshold"], d["method"], d["score_min"], d["score_max"], d["num_images"])

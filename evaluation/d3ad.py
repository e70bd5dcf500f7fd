"""What a D3AD bundle needs from good images the model did not train on (never test images): the
histogram of their one-step scores (which sets each image's noise level, models/d3ad.py) and the
threshold of the D3AD scores themselves (one-step's calibration does not carry over: the scores differ)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from ..models import checkpoint as ckpt
from ..models.d3ad import D3ADConfig, score_histogram_edges
from ..models.diffusionad import DiffusionAD
from ..training.data import find_validation_images, list_images, read_images
from .evaluate import Calibration, predict
from .metrics import threshold_from_quantile

log = logging.getLogger("diffad.d3ad")

# "d3ad" is the paper's method (a noise level per image); "d3ad-fixed" every image from max_step
EXPORT_MODES = {"one-step": "off", "d3ad": "dynamic", "d3ad-fixed": "fixed"}


def good_images_for(run_dir: str | Path, given: str | Path | None = None) -> list[Path]:
    """Good images the run did not train on: `given` (a folder), else the images the run held out of
    train/good, else the category's validation/good."""
    if given is not None:
        folder = Path(given)
        found = list_images(folder) if folder.is_dir() else []
        if len(found) < 2:
            raise ValueError(f"--good-images {folder}: need a folder with at least 2 good images")
        return found
    config_file = Path(run_dir) / ckpt.CONFIG_FILE
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    held = [Path(p) for p in config.get("held_out_images") or [] if Path(p).is_file()]
    if len(held) >= 2:
        return held
    if config.get("data_dir"):
        validation = find_validation_images(config["data_dir"])
        if len(validation) >= 2:
            return validation
    raise ValueError(f"{run_dir} names no good images it did not train on (its held-out images or the category's "
                     "validation/good): give a folder of them with --good-images DIR")


def calibrate_d3ad(model: DiffusionAD, good_images: np.ndarray, mode: str, quantile: float = 0.99,
                   batch_size: int = 8, progress: bool = True) -> tuple[D3ADConfig, Calibration]:
    """The D3AD settings for `mode` ("fixed" or "dynamic") and the threshold of its scores, from good
    images [N, H, W, C] in [0, 1]. The model is left in that mode."""
    base = model.config.d3ad
    model.set_d3ad(D3ADConfig(mode="off", steps=base.steps, w=base.w, max_step=base.max_step))
    edges = one_step_bin_edges(model, good_images, batch_size, progress) if mode == "dynamic" else ()
    d3ad = D3ADConfig(mode=mode, steps=base.steps, w=base.w, max_step=base.max_step, bin_edges=edges)
    model.set_d3ad(d3ad)
    _, scores = predict(model, good_images, batch_size, f"d3ad ({mode}) scores of good images", progress)
    threshold = threshold_from_quantile(scores, quantile)
    calibration = Calibration(threshold, f"quantile {quantile} of held-out good images (d3ad {mode})",
                              float(scores.min()), float(scores.max()), len(good_images))
    log.info("d3ad (%s): threshold %.4f from %d good images", mode, threshold, len(good_images))
    return d3ad, calibration


def one_step_bin_edges(model: DiffusionAD, good_images: np.ndarray, batch_size: int = 8,
                       progress: bool = True) -> tuple[float, ...]:
    """The per-image level's bins: the histogram edges of good images' one-step scores (the model must be
    in one-step mode, set_d3ad(D3ADConfig()))."""
    if model.config.d3ad.mode != "off":
        raise ValueError("the bins are made of one-step scores: put the model in one-step mode first")
    _, scores = predict(model, good_images, batch_size, "one-step scores of good images", progress)
    edges = score_histogram_edges(scores)
    log.info("d3ad: one-step scores of %d good images span %.4f..%.4f (10 bins)", len(good_images), edges[0],
             edges[-1])
    return edges


def read_good_images(paths: list[Path], model: DiffusionAD) -> np.ndarray:
    return read_images(paths, model.config.image_size, model.config.in_channels)


def evaluate_d3ad_modes(run_dir: str | Path, data_dir: str | Path, batch_size: int = 8,
                        progress: bool = True, device: str = "cpu") -> dict:
    """The run's model on data_dir's test set in D3AD's two modes, on the same weights as its one-step
    evaluation: {"d3ad-fixed": {...}, "d3ad": {...}}, each the test metrics, images/s and the settings
    (the per-image level's bins and the threshold from the run's held-out good images); fp32 on `device`."""
    from .evaluate import read_test_set
    from .metrics import compute_metrics

    model = ckpt.load_model(run_dir).to(device)
    good = read_good_images(good_images_for(run_dir), model)
    test = read_test_set(data_dir, model.config.image_size, model.config.in_channels, progress)  # once for both
    out = {}
    for name, mode in (("d3ad-fixed", "fixed"), ("d3ad", "dynamic")):
        d3ad, calibration = calibrate_d3ad(model, good, mode, progress=progress)
        started = time.monotonic()
        maps, scores = predict(model, test.images, batch_size, f"evaluating {name}", progress)
        images_per_s = round(len(test.images) / (time.monotonic() - started), 2)
        metrics = compute_metrics(test.labels, scores, test.masks, maps)
        out[name] = {**{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap",
                                                "image_f1_max")},
                     "inference_images_per_s": images_per_s,
                     "threshold": calibration.threshold, "d3ad": dataclasses.asdict(d3ad)}
        log.info("%s: image AUROC %.3f, pixel AUROC %.3f, AUPRO %.3f, %.2f images/s", name, metrics["image_auroc"],
                 metrics["pixel_auroc"], metrics["pixel_aupro"], images_per_s)
    return out


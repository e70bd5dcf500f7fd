"""DeCo-Diff training (models/decodiff.py): one UNet on the good images of one or several categories.

Each step: a batch of good images (or random crops of them) drawn from the union of the categories, a
step t ~ U{0..9} per image, the paper's masked forward process with shuffled-patch noise, MSE between the
predicted and the true deviation. The category is the UNet's class condition.

As DiffusionAD's training (training/trainer.py), whose pieces it uses: the precision follows the hardware,
an EMA of the weights is kept, and every `validate_every` steps the EMA model is scored on each category's
validation set (held-out good images, each also with a fixed-seed synthetic anomaly); the model with the
best mean score is kept. Then the image score's rule is chosen on the same validation sets: the paper's
map maximum, or a top-k mean, of the map as it is or measured against the maps of good training images
(models/map_reference.py). Test labels are never looked at.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..evaluation.evaluate import predict
from ..models import checkpoint as ckpt
from ..models.decodiff import DeCoDiff, DeCoDiffConfig, corrupt
from ..models.presets import count_parameters, decodiff_preset
from .data import detect_channels, find_train_images
from .score_rule import REFERENCE_IMAGES, choose_score_rule
from .synthesis import AnomalySynthesizer, SynthesisConfig
from .trainer import (
    BEST_FILE,
    EMA,
    LEARNING_RATES,
    VALIDATION_LOG,
    ResumableSampler,
    SyntheticAnomalyDataset,
    TrainConfig,
    budget_progress,
    choose_precision,
    layout_name,
    load_training_images,
    lr_factor,
    memory_format,
    split_validation,
    standardization,
    validation_metrics,
)

log = logging.getLogger("diffad.train")

PAPER_SCORE_RULE = (False, 1)  # (score_reference, top_k): the map's maximum


def category_names(data_dirs: list[str | Path]) -> tuple[str, ...]:
    """Each category's name: its folder's name (distinct names required: they are the class condition)."""
    names = tuple(Path(d).resolve().name for d in data_dirs)
    if len(set(names)) != len(names):
        raise ValueError(f"the categories' folders must have distinct names (they name the categories): {names}")
    return names


class NoSynthesis(AnomalySynthesizer):
    """DeCo-Diff trains on good images only: the dataset's crops without a synthetic anomaly."""

    def __call__(self, image, rng, foreground=None, force=None):
        return image, np.zeros(image.shape[:2], np.float32), False


class CategoryCrops(SyntheticAnomalyDataset):
    """Good images (or crops of them) of several categories: an item is [K, C, N, N] crops and their [K]
    category indices."""

    def __init__(self, images: np.ndarray, classes: np.ndarray, crop: int | None, crops: int):
        super().__init__(images, None, NoSynthesis(SynthesisConfig()), crop, crops)
        self.classes = classes

    def __getitem__(self, key: tuple[int, int]):
        crops, _, _ = super().__getitem__(key)
        return crops, torch.full((crops.shape[0],), int(self.classes[key[0]]), dtype=torch.long)


def train_decodiff(data_dirs: list[str | Path], run_dir: str | Path, preset_name: str = "small",
                   image_size: int | None = None, channels: int | None = None,
                   train_config: TrainConfig | None = None, progress: bool = True) -> dict:
    """Train one DeCo-Diff model on the good images of every folder in data_dirs; returns the summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = train_config or TrainConfig()
    if cfg.max_steps is None and cfg.max_minutes is None:
        raise ValueError("give a budget: max_steps, max_minutes or both")
    names = category_names(data_dirs)
    torch.manual_seed(cfg.seed)
    size = image_size or decodiff_preset(preset_name, names).image_size
    synthesis = cfg.synthesis  # for the validation sets' anomalies only

    if channels is None:  # one input for every category: colour if any category is in colour
        channels = max(detect_channels(find_train_images(d)) for d in data_dirs)
    images, classes, vsets, held, references = [], [], {}, {}, {}
    for index, (name, data_dir) in enumerate(zip(names, data_dirs, strict=True)):
        paths, ims, fgs, channels = load_training_images(data_dir, size, channels, synthesis.foreground)
        paths, ims, fgs, vset, held_paths = split_validation(data_dir, paths, ims, fgs, channels,
                                                             cfg.validation_fraction, synthesis)
        images.append(ims), classes.append(np.full(len(ims), index))
        held[name], references[name] = held_paths, ims[:REFERENCE_IMAGES]
        if vset is not None:
            vsets[name] = vset
        log.info("category %s: %d training images; validation %s", name, len(ims), vset.source if vset else "none")
    images, classes = np.concatenate(images), np.concatenate(classes)

    model_config = decodiff_preset(preset_name, names, size, channels)
    if cfg.standardize:
        model_config.input_mean, model_config.input_std = standardization(images)
        model_config = DeCoDiffConfig.from_dict(model_config.to_dict())
    device = torch.device(cfg.device)
    precision, precision_reason = choose_precision(cfg.precision, device)
    layout = memory_format(cfg.memory_format, device, precision)
    model = DeCoDiff(model_config).to(device, memory_format=layout)
    lr = LEARNING_RATES.get(preset_name, (cfg.unet_lr,))[0] if train_config is None else cfg.unet_lr
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=lr, weight_decay=1e-4)  # the paper's optimiser
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    (run_dir / ckpt.CONFIG_FILE).write_text(json.dumps(
        {"method": "decodiff", "model": model_config.to_dict(), "train": asdict(cfg),
         "data_dirs": [str(d) for d in data_dirs], "categories": list(names), "num_train_images": len(images),
         "held_out_images_by_category": held,
         "held_out_images": held[names[0]] if len(names) == 1 else None}, indent=2))
    log.info("DeCo-Diff %s: %d px, %d channel(s), %d categor%s, UNet %.2f M params; precision %s (%s), "
             "memory layout %s",
             preset_name, size, channels, len(names), "y" if len(names) == 1 else "ies",
             count_parameters(model.unet) / 1e6, precision, precision_reason, layout_name(layout))

    dataset = CategoryCrops(images, classes, cfg.crop, cfg.crops_per_image)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=ResumableSampler(len(dataset), cfg.seed),
                        num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                        prefetch_factor=4 if cfg.workers > 0 else None)
    alpha_bar = model.alpha_bar.cpu()
    best_score, validations = -math.inf, []

    def check(step: int) -> dict:
        nonlocal best_score
        candidate = ema.model if ema else model
        per_category = {}
        for name, vset in vsets.items():
            candidate.set_category(name)
            per_category[name] = validation_metrics(vset, *predict(candidate, vset.images, progress=False))
        candidate.set_category(names[0])
        score = float(np.mean([r["score"] for r in per_category.values()]))
        if score > best_score:
            best_score = score
            ckpt.save_model(run_dir / BEST_FILE, candidate, {"step": step, "validation_score": score})
        validations.append({"step": step, "score": score, "categories": per_category})
        with (run_dir / VALIDATION_LOG).open("a") as f:
            f.write(json.dumps(validations[-1]) + "\n")
        return validations[-1]

    model.train()
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes is not None else math.inf
    started, step, history = time.monotonic(), 0, []
    bar = tqdm(total=cfg.max_steps, desc="training", unit="step", disable=not progress)
    log_file = (run_dir / "train_log.jsonl").open("a")
    try:
        for images_b, classes_b in loader:
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            if time.monotonic() - started >= budget_s:
                log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, step)
                break
            classes_b = classes_b.flatten().to(device)
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            factor = lr_factor(cfg, step, budget_progress(step, cfg.max_steps, time.monotonic() - started, budget_s))
            optimizer.param_groups[0]["lr"] = lr * factor
            x0 = model.normalize(images_b.flatten(0, 1).to(device, memory_format=layout))
            t = torch.randint(0, model_config.num_steps, (x0.shape[0],), generator=generator)
            x_t, target = corrupt(x0, model_config, alpha_bar, t, generator)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                predicted = model.unet(x_t, t.to(device), classes_b)
            loss = F.mse_loss(predicted.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if ema:
                ema.update(model, step)
            history.append(float(loss.detach()))
            bar.update(1)
            if step % cfg.log_every == 0:
                bar.set_postfix(mse=f"{np.mean(history[-cfg.log_every:]):.4f}")
                log_file.write(json.dumps({"step": step, "elapsed_s": round(time.monotonic() - started, 1),
                                           "lr_factor": round(factor, 4),
                                           "mse": float(np.mean(history[-cfg.log_every:]))}) + "\n")
                log_file.flush()
            if vsets and step % cfg.validate_every == 0:
                result = check(step)
                bar.set_description(f"training (val {result['score']:.3f}, best {best_score:.3f})")
                model.train()
    finally:
        bar.close()
        log_file.close()

    elapsed = time.monotonic() - started
    if vsets and step % cfg.validate_every != 0:
        check(step)
    if vsets and (run_dir / BEST_FILE).is_file():
        final = ckpt.load_model(run_dir / BEST_FILE).to(memory_format=layout)
        chosen_step = int(ckpt.read_metadata(run_dir / BEST_FILE)["step"])
    else:
        final, chosen_step = copy.deepcopy(ema.model if ema else model).cpu(), step
    final.eval().cpu()
    score_rule = None
    if vsets:
        fit_map_reference(final, references)
        maps = {}
        for name, vset in vsets.items():
            final.set_category(name)
            maps[name] = predict(final, vset.images, progress=False)[0]
        final.set_category(names[0])
        score_rule = select_score_rule(final, maps, {name: vset.labels for name, vset in vsets.items()})
        log.info("image score: %s (validation image AUROC %s)", score_rule["chosen"],
                 ", ".join(f"{k} {v:.3f}" for k, v in score_rule["scores"].items()))
    summary = {
        "method": "decodiff", "preset": preset_name, "categories": list(names), "steps": step,
        "chosen_step": chosen_step, "train_seconds": round(elapsed, 1),
        "seconds_per_step": round(elapsed / max(step, 1), 3),
        "images_seen": step * cfg.batch_size * cfg.crops_per_image, "num_train_images": len(images),
        "crop": cfg.crop, "crops_per_image": cfg.crops_per_image, "precision": precision,
        "precision_reason": precision_reason, "memory_format": layout_name(layout),
        "final_mse": float(np.mean(history[-50:])) if history else None,
        "image_size": size, "in_channels": channels,
        "validation": {"chosen": max(validations, key=lambda v: v["score"]) if validations else None,
                       "score_rule": score_rule, "history": validations} if vsets else None,
        "unet_params_m": round(count_parameters(final.unet) / 1e6, 3),
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": str(device),
    }
    ckpt.save_model(run_dir / ckpt.MODEL_FILE, final, {"step": chosen_step, "training": json.dumps(summary)})
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    log.info("trained %d steps in %.1f min (%.2f s/step); kept step %d; model saved to %s", step, elapsed / 60,
             summary["seconds_per_step"], chosen_step, run_dir / ckpt.MODEL_FILE)
    return summary


@torch.inference_mode()
def fit_map_reference(model: DeCoDiff, references: dict[str, np.ndarray]) -> None:
    """Fit each category's map reference on the maps of its good training images [N, H, W, C]."""
    for name, images in references.items():
        model.set_category(name)
        maps = predict(model, images, progress=False)[0]
        model.map_reference.fit(model.config.categories.index(name), torch.from_numpy(maps)[:, None])
    model.set_category(model.config.categories[0])


def select_score_rule(model: DeCoDiff, maps: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict:
    """Choose the image score's rule by the mean validation image AUROC over the categories, given each one's
    validation maps [N, H, W] and labels (training/score_rule.py; ties: the paper's map maximum)."""
    def score_maps(name: str, category_maps: torch.Tensor) -> torch.Tensor:
        classes = torch.full((len(category_maps),), model.config.categories.index(name))
        return model.score(category_maps, classes)

    return choose_score_rule(model, maps, labels, score_maps, PAPER_SCORE_RULE)

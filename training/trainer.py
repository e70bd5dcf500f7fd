"""Joint training of the reconstruction UNet and the segmentation network (DiffusionAD).

One step on a batch of good images (or of random crops of them, several per image), about half of them
given a synthetic anomaly:
1. noise every image at a small step t_s ~ U{0..299} and a large one t_l ~ U{300..999}; the UNet
   predicts both noises in one batched call; MSE counts only the images without an anomaly;
2. the norm-guided one-step reconstruction from the two predictions goes, with the image, into the
   segmentation network: 5 x focal loss (gamma 4) + smooth L1 against the synthetic mask.

Around the loop, what makes the last checkpoint no lottery: an exponential moving average (EMA) of the
weights; a validation set that needs no test data (good images held out of training, or validation/good,
each also with a fixed-seed synthetic anomaly); every `validate_every` steps the EMA model, its BatchNorm
statistics re-estimated on good images, is scored on it and the best is kept; at the end t_s, the map's
smoothing and the image score's rule (training/score_rule.py) are chosen on the same set. Test labels are
never looked at.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from ..evaluation.evaluate import predict
from ..evaluation.metrics import image_auroc, pixel_ap, pixel_auroc
from ..hardware import convolution_layout, cpu_computes_bf16
from ..models import checkpoint as ckpt
from ..models.diffusionad import DiffusionAD, ModelConfig, smooth_map_at
from ..models.presets import describe, preset
from ..models.schedule import clamp
from .data import detect_channels, find_train_images, find_validation_images, read_images
from .score_rule import REFERENCE_IMAGES, choose_score_rule, rule_name
from .synthesis import AnomalySynthesizer, SynthesisConfig, estimate_foreground

log = logging.getLogger("diffad.train")

# The paper trains for 3000 epochs with these rates; a budget of minutes on a CPU needs larger ones.
LEARNING_RATES = {"paper": (1e-4, 1e-5), "small": (1e-3, 1e-3), "tiny": (2e-3, 2e-3)}
# Crop training by preset, (crop, crops per image), chosen on the validation signal (README, "Results");
# the paper preset trains on whole images as the paper does.
CROPS = {"small": (64, 4), "tiny": (None, 1), "paper": (None, 1)}
# The preset's crops are for textures. A part on a plain background trains on whole images: most crops of it
# are background, and the segmentation network never sees the whole part (mvtec3d_tire, 3 seeds: validation
# 0.592 against 0.532). An image shows a part when its estimated foreground covers less than this share.
OBJECT_FOREGROUND_SHARE = 0.95


@dataclass
class TrainConfig:
    batch_size: int = 8
    unet_lr: float = 1e-4
    segmentation_lr: float = 1e-5
    max_steps: int | None = None
    max_minutes: float | None = None
    seed: int = 0
    t_s_range: tuple[int, int] = (0, 300)        # sampled from [low, high)
    t_l_range: tuple[int, int] = (300, 1000)
    # Cosine decay over the budget (the step or the time budget, whichever runs out first) after a short
    # warm-up: a run stopped by the clock then ends at a low learning rate instead of mid-swing.
    lr_schedule: str = "cosine"                  # "cosine" or "constant"
    warmup_steps: int = 50
    final_lr_fraction: float = 0.05
    focal_weight: float = 5.0
    focal_gamma: float = 2.0   # DRAEM's; the paper's 4 barely pushes the background down in a short run
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    workers: int = 1
    # "auto": bf16 autocast only where the hardware computes bf16 natively (emulated bf16 on an AVX2-only
    # CPU is 25-85x slower than fp32), else fp32; "bf16" or "fp32" force it.
    precision: str = "auto"
    # "auto": diffad.hardware.convolution_layout (channels-last except bf16 on a CPU); or "channels_last",
    # "contiguous". A speed choice only: the values are the same.
    memory_format: str = "auto"
    device: str = "cpu"    # "cuda" trains on the GPU; timesteps and noise are still drawn on the CPU (same run)
    # Random crops of `crop` px (None: whole images), `crops_per_image` of them per image and step, each with
    # its own synthetic anomaly: more distinct samples and a larger BatchNorm batch for the same compute.
    crop: int | None = None
    crops_per_image: int = 1
    # The crop is the preset's default: whole images instead if the training images show a part on a plain
    # background (shows_a_part). The resolved crop is what the run's config and summary record.
    whole_images_for_objects: bool = False
    standardize: bool = True     # the model's input standardised by the training images' mean and std
    segmentation_input: str = "pair"  # ModelConfig.segmentation_input of a new model: "pair" or "difference"
    ema_decay: float = 0.995     # 0 turns the EMA off (the raw weights are used)
    # Validation without test data: validation/good if the category has it, else this share of train/good
    # (at least 4, at most 64 images, the same split for every seed), each also with a synthetic anomaly.
    validation_fraction: float = 0.1
    validate_every: int = 100
    t_s_candidates: tuple[int, ...] = (100, 150, 200, 250, 300)  # chosen on the validation set at the end
    # then the map smoothing; None: 0, s/2, s, 2s of the preset's; one value: the user's, kept without a choice
    map_sigma_candidates: tuple[float, ...] | None = None
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)


def crop_setting(preset_name: str, crop: int | None,
                 crops_per_image: int | None) -> tuple[int | None, int, bool]:
    """(crop, crops per image, whole images for objects) from the command line: None takes the preset's
    default, which gives way to whole images on a part against a plain background unless the crops per
    image were asked for; 0 is whole images."""
    default_crop, default_count = CROPS.get(preset_name, (None, 1))
    if crop is None:
        return default_crop, crops_per_image or default_count, default_crop is not None and crops_per_image is None
    return (crop or None), crops_per_image or 1, False


def shows_a_part(foregrounds: np.ndarray | None) -> bool:
    """Whether most images show a part on a plain background (their estimated foreground, [N, H, W] bool,
    covers less than OBJECT_FOREGROUND_SHARE of the image) rather than a texture (None: not estimated)."""
    if foregrounds is None or len(foregrounds) == 0:
        return False
    shares = foregrounds.reshape(len(foregrounds), -1).mean(axis=1)
    return bool(np.mean(shares < OBJECT_FOREGROUND_SHARE) > 0.5)


# --- precision -----------------------------------------------------------------------------------
def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: AVX512-BF16 or AMX on a CPU, or a CUDA GPU with bf16
    support."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_computes_bf16()


def choose_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """("bf16" | "fp32", why) for a requested "auto", "bf16" or "fp32" on `device`."""
    if requested not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {requested!r}")
    native = native_bf16(device)
    where = "this GPU" if device.type == "cuda" else "this CPU"
    if requested == "fp32":
        return "fp32", "asked for"
    if requested == "bf16":
        return "bf16", "asked for" + ("" if native else f"; {where} emulates bf16, expect it to be much slower")
    if native:
        return "bf16", f"{where} computes bf16 natively"
    return "fp32", f"{where} has no native bf16 (emulated bf16 is far slower than fp32)"


def memory_format(requested: str, device: torch.device, precision: str) -> torch.memory_format:
    """The networks' memory layout for a requested "auto", "channels_last" or "contiguous"."""
    if requested not in ("auto", "channels_last", "contiguous"):
        raise ValueError(f"memory_format must be auto, channels_last or contiguous, got {requested!r}")
    name = convolution_layout(device.type, precision) if requested == "auto" else requested
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def layout_name(layout: torch.memory_format) -> str:
    return "channels_last" if layout == torch.channels_last else "contiguous"


# --- data ----------------------------------------------------------------------------------------
class SyntheticAnomalyDataset(Dataset):
    """Good images in memory; an item is `crops` random crops of one image (the whole image when crop is
    None), each given (or not) its own synthetic anomaly, all drawn from the item's seed.

    Items are [K, C, N, N] images, [K, 1, N, N] masks and [K] anomaly flags; the loop flattens K into the batch.
    """

    def __init__(self, images: np.ndarray, foregrounds: np.ndarray | None, synthesizer: AnomalySynthesizer,
                 crop: int | None = None, crops: int = 1):
        size = images.shape[1]
        if crop is not None and not 0 < crop <= size:
            raise ValueError(f"crop must be in 1..{size} (the training image size), got {crop}")
        self.images, self.foregrounds, self.synthesizer = images, foregrounds, synthesizer
        self.crop, self.crops = crop, crops

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        index, sample_seed = key
        rng = np.random.default_rng(sample_seed)
        full, size = self.images[index], self.images.shape[1]
        full_fg = self.foregrounds[index] if self.foregrounds is not None else None
        images, masks, flags = [], [], []
        for _ in range(self.crops):
            image, fg = full, full_fg
            if self.crop is not None and self.crop < size:
                top, left = (int(v) for v in rng.integers(0, size - self.crop + 1, size=2))
                window = (slice(top, top + self.crop), slice(left, left + self.crop))
                image = full[window]
                fg = full_fg[window] if full_fg is not None else None
            # A crop of background only stays a good sample: defects belong on the part.
            background_only = fg is not None and not fg.any()
            image, mask, has_anomaly = self.synthesizer(image, rng, fg, force=False if background_only else None)
            images.append(image.transpose(2, 0, 1))
            masks.append(mask[None])
            flags.append(float(has_anomaly))
        return (torch.from_numpy(np.ascontiguousarray(np.stack(images))), torch.from_numpy(np.stack(masks)),
                torch.tensor(flags))


class ResumableSampler(Sampler):
    """An endless stream of (image index, sample seed), a fresh permutation each epoch.

    Sample n of the stream depends only on (seed, n), so a resumed run sees exactly the data the
    uninterrupted run would have seen.
    """

    def __init__(self, num_images: int, seed: int, start_sample: int = 0):
        self.num_images, self.seed, self.start = num_images, seed, start_sample

    def __iter__(self):
        n = self.start
        while True:
            epoch, offset = divmod(n, self.num_images)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_images)
            for i in range(offset, self.num_images):
                yield int(order[i]), int(np.random.SeedSequence([self.seed, n]).generate_state(1)[0])
                n += 1


# --- losses --------------------------------------------------------------------------------------
def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Binary focal loss, mean over pixels: -(1 - p_t)^gamma log p_t."""
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    log_pt = target * log_p + (1 - target) * log_not_p
    return (-(1 - log_pt.exp()) ** gamma * log_pt).mean()


def training_step(model: DiffusionAD, images: torch.Tensor, masks: torch.Tensor, has_anomaly: torch.Tensor,
                  cfg: TrainConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The joint loss for one batch; images in [0, 1], masks [N, 1, H, W] in {0, 1}.

    cfg.precision must be resolved ("bf16" or "fp32", see choose_precision)."""
    sched, n, device = model.schedule, images.shape[0], images.device
    bf16 = cfg.precision == "bf16"
    x = model.normalize(images)
    # Drawn on the CPU from the step's generator, then moved: the same numbers on any device.
    t_s = torch.randint(*cfg.t_s_range, (n,), generator=generator).to(device)
    t_l = torch.randint(*cfg.t_l_range, (n,), generator=generator).to(device)
    t = torch.cat([t_s, t_l])
    noise = torch.randn((2 * n, *x.shape[1:]), generator=generator).to(device)
    x_t = sched.q_sample(torch.cat([x, x]), t, noise)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        eps = model.unet(x_t, t).float()

    # Noise loss on the clean images only: the UNet must learn what normal looks like.
    clean = (1.0 - has_anomaly).repeat(2)
    per_sample = (eps - noise).pow(2).flatten(1).mean(1)
    noise_loss = (per_sample * clean).sum() / clean.sum().clamp(min=1.0)

    x0_s = sched.predict_x0(x_t[:n], t_s, eps[:n])
    x0_l = clamp(sched.predict_x0(x_t[n:], t_l, eps[n:]), model.pixel_bounds)
    x0_g = sched.guided_x0(x0_s, x0_l, t_s, model.config.w, model.pixel_bounds)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model.segment(x, x0_g).float()
    focal = focal_loss(logits, masks, cfg.focal_gamma)
    smooth_l1 = F.smooth_l1_loss(torch.sigmoid(logits), masks)
    loss = noise_loss + cfg.focal_weight * focal + smooth_l1
    return {"loss": loss, "noise": noise_loss.detach(), "focal": focal.detach(), "smooth_l1": smooth_l1.detach()}


# --- weights averaging, BatchNorm statistics, validation ---------------------------------------------
class EMA:
    """An exponential moving average of a model's weights (buffers copied as they are)."""

    def __init__(self, model: DiffusionAD, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: DiffusionAD, step: int) -> None:
        # The usual warm-up (1 + step) / (10 + step): early weights are not averaged in for long.
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        for mine, theirs in zip(self.model.parameters(), model.parameters(), strict=True):
            mine.lerp_(theirs, 1.0 - decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)


@torch.no_grad()
def reestimate_batchnorm(model: DiffusionAD, images: np.ndarray, batch_size: int = 8) -> None:
    """Recompute the segmentation network's BatchNorm statistics on good whole images (the inference input).

    Training's running statistics mix synthetic anomalies and crops and lag behind the (averaged)
    weights; a plain average over good images at full size is what the network meets in service.
    """
    norms = [m for m in model.segmentation.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or len(images) == 0:
        return
    device = model.noise.device
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch below
        m.train()
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size].transpose(0, 3, 1, 2)))
        model(batch.to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
        m.eval()


@dataclass
class ValidationSet:
    """Good images never trained on, each once as it is and once with a fixed-seed synthetic anomaly."""

    images: np.ndarray   # [M, H, W, C] in [0, 1]
    masks: np.ndarray    # [M, H, W] in {0, 1}
    labels: np.ndarray   # [M] 0 good, 1 with an anomaly
    source: str          # where the good images came from

    def __len__(self) -> int:
        return len(self.labels)


VALIDATION_SEED = 20_240_303  # fixed: every run and seed is validated on the same anomalies


def make_validation_set(good: np.ndarray, foregrounds: np.ndarray | None, synthesis: SynthesisConfig,
                        source: str) -> ValidationSet:
    synthesizer = AnomalySynthesizer(synthesis)
    images, masks, labels = [], [], []
    empty = np.zeros(good.shape[1:3], np.float32)
    for i, image in enumerate(good):
        images.append(image), masks.append(empty), labels.append(0)
        fg = foregrounds[i] if foregrounds is not None else None
        anomalous, mask, made = synthesizer(image, np.random.default_rng([VALIDATION_SEED, i]), fg, force=True)
        if made:
            images.append(anomalous), masks.append(mask), labels.append(1)
    return ValidationSet(np.stack(images), np.stack(masks), np.array(labels), source)


@torch.inference_mode()
def validate(model: DiffusionAD, vset: ValidationSet, batch_size: int = 8) -> dict[str, float]:
    """Image AUROC, pixel AUROC and pixel AP on the validation set, and their mean (the selection score)."""
    return validation_metrics(vset, *predict(model, vset.images, batch_size, progress=False))


def validation_metrics(vset: ValidationSet, maps_np: np.ndarray, scores_np: np.ndarray) -> dict[str, float]:
    result = {"image_auroc": image_auroc(vset.labels, scores_np), "pixel_auroc": pixel_auroc(vset.masks, maps_np),
              "pixel_ap": pixel_ap(vset.masks, maps_np)}
    # The train/eval map check: does the map tell the anomaly from its surroundings at all?
    inside = vset.masks > 0
    result["map_mean_inside"] = float(maps_np[inside].mean()) if inside.any() else float("nan")
    result["map_mean_outside"] = float(maps_np[~inside].mean())
    result["score"] = float(np.mean([result["image_auroc"], result["pixel_auroc"], result["pixel_ap"]]))
    return result


def holdout_split(num_images: int, fraction: float) -> np.ndarray:
    """Indices of the images held out for validation: a fixed permutation (not the run's seed), so every
    seed of a benchmark trains and validates on the same images."""
    if fraction <= 0 or num_images < 8:
        return np.array([], dtype=int)
    count = int(min(64, max(4, round(fraction * num_images))))
    return np.sort(np.random.default_rng(0).permutation(num_images)[:count])


def standardization(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of [N, H, W, C] images (std floored at 0.01: a flat category stays finite)."""
    mean = images.mean(axis=(0, 1, 2), dtype=np.float64)
    std = np.maximum(images.std(axis=(0, 1, 2), dtype=np.float64), 0.01)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


# --- the run -------------------------------------------------------------------------------------
def training_device(name: str) -> str:
    """`name` checked as a device to train on (cpu or an available cuda[:N]); ValueError says what is wrong."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available to this PyTorch ({torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    return str(device)


def make_optimizer(model: DiffusionAD, cfg: TrainConfig) -> torch.optim.Adam:
    return torch.optim.Adam([
        {"params": model.unet.parameters(), "lr": cfg.unet_lr},
        {"params": model.segmentation.parameters(), "lr": cfg.segmentation_lr},
    ])


def lr_factor(cfg: TrainConfig, step: int, progress: float) -> float:
    """The learning-rate multiplier at `step`, `progress` being the used fraction of the budget (0..1)."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.lr_schedule == "constant":
        return warmup
    if cfg.lr_schedule != "cosine":
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {cfg.lr_schedule!r}")
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return warmup * (cfg.final_lr_fraction + (1.0 - cfg.final_lr_fraction) * cosine)


def budget_progress(step: int, end_step: int | None, elapsed_s: float, budget_s: float) -> float:
    """The used fraction of the budget: steps or time, whichever is further along (a resumed run's time
    budget counts from the resume, as its --max-minutes does)."""
    by_steps = step / end_step if end_step else 0.0
    by_time = elapsed_s / budget_s if math.isfinite(budget_s) else 0.0
    return max(by_steps, by_time)


def load_training_images(data_dir: str | Path, image_size: int, channels: int | None, foreground: str):
    paths = find_train_images(data_dir)
    channels = channels or detect_channels(paths)
    images = read_images(list(tqdm(paths, desc="reading images", unit="img", leave=False)), image_size, channels)
    foregrounds = np.stack([estimate_foreground(im) for im in images]) if foreground == "auto" else None
    return paths, images, foregrounds, channels


def split_validation(data_dir, paths: list[Path], images: np.ndarray, foregrounds: np.ndarray | None,
                     channels: int, fraction: float, synthesis: SynthesisConfig):
    """(training paths, images, foregrounds, ValidationSet or None, held-out paths).

    validation/good when the category has one (training keeps every train/good image), else a fixed share
    of train/good held out of training (holdout_split)."""
    extra = find_validation_images(data_dir)
    if extra:
        val_images = read_images(extra, images.shape[1], channels)
        val_fg = np.stack([estimate_foreground(im) for im in val_images]) if foregrounds is not None else None
        source, held_paths = f"{len(extra)} images of validation/good", []
    else:
        held = holdout_split(len(images), fraction)
        keep = np.setdiff1d(np.arange(len(images)), held)
        val_images, val_fg = images[held], foregrounds[held] if foregrounds is not None else None
        source, held_paths = f"{len(held)} images held out of train/good", [str(paths[i]) for i in held]
        images, foregrounds = images[keep], foregrounds[keep] if foregrounds is not None else None
        paths = [paths[i] for i in keep]
    vset = make_validation_set(val_images, val_fg, synthesis, source) if len(val_images) else None
    return paths, images, foregrounds, vset, held_paths


def run_validation_set(run_dir: str | Path, data_dir: str | Path, image_size: int, channels: int,
                       synthesis: SynthesisConfig | None = None) -> ValidationSet | None:
    """A finished run's validation set, rebuilt as its training built it (the same held-out good images,
    foregrounds and fixed-seed anomalies); `synthesis` other anomaly sources than the run's own."""
    cfg = _train_config_from_dict(json.loads((Path(run_dir) / ckpt.CONFIG_FILE).read_text())["train"])
    synthesis = synthesis or cfg.synthesis
    paths, images, foregrounds, _ = load_training_images(data_dir, image_size, channels, synthesis.foreground)
    *_, vset, _ = split_validation(data_dir, paths, images, foregrounds, channels, cfg.validation_fraction, synthesis)
    return vset


VALIDATION_LOG = "validation_log.jsonl"
BEST_FILE = "best.safetensors"   # the best EMA model by validation score so far (metadata: step, score)


def train(data_dir: str | Path, run_dir: str | Path, preset_name: str = "small", image_size: int | None = None,
          channels: int | None = None, train_config: TrainConfig | None = None, resume: bool = False,
          progress: bool = True) -> dict:
    """Train a model on the good images of data_dir; everything lands in run_dir. Returns the summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = ckpt.latest_training_state(run_dir) if resume else None
    if resume and state_path is None:
        raise ckpt.CheckpointError(f"nothing to resume in {run_dir / ckpt.CHECKPOINT_DIR}")

    if state_path is not None:
        saved = json.loads((run_dir / ckpt.CONFIG_FILE).read_text())
        model_config = ModelConfig.from_dict(saved["model"])
        cfg = train_config or _train_config_from_dict(saved["train"])
        if train_config is not None:  # budgets may change on resume; the data recipe may not
            saved_cfg = _train_config_from_dict(saved["train"])
            cfg.synthesis, cfg.crop = saved_cfg.synthesis, saved_cfg.crop
            cfg.crops_per_image = saved_cfg.crops_per_image
        image_size, channels = model_config.image_size, model_config.in_channels
    else:
        cfg = train_config or TrainConfig()
    if cfg.max_steps is None and cfg.max_minutes is None:
        raise ValueError("give a budget: max_steps, max_minutes or both")
    if cfg.crops_per_image < 1:
        raise ValueError(f"crops_per_image must be at least 1, got {cfg.crops_per_image}")
    if not 0 <= cfg.ema_decay < 1 or not 0 <= cfg.validation_fraction < 1:
        raise ValueError(f"ema_decay and validation_fraction must be in [0, 1), got {cfg.ema_decay} and "
                         f"{cfg.validation_fraction}")
    if cfg.map_sigma_candidates is not None and not (
            cfg.map_sigma_candidates and all(0 <= s < math.inf for s in cfg.map_sigma_candidates)):
        raise ValueError(f"map_sigma_candidates must be one or more finite sigmas >= 0, got {cfg.map_sigma_candidates}")

    torch.manual_seed(cfg.seed)
    paths, images, foregrounds, channels = load_training_images(
        data_dir, image_size or preset(preset_name).image_size, channels, cfg.synthesis.foreground)

    paths, images, foregrounds, vset, held_paths = split_validation(data_dir, paths, images, foregrounds, channels,
                                                                    cfg.validation_fraction, cfg.synthesis)
    if state_path is None and cfg.whole_images_for_objects and cfg.crop is not None and shows_a_part(foregrounds):
        log.info("the training images show a part on a plain background: whole images instead of the preset's "
                 "%d px crops (--crop chooses)", cfg.crop)
        cfg = dataclasses.replace(cfg, crop=None, crops_per_image=1)

    if state_path is None:
        model_config = preset(preset_name, image_size=images.shape[1], in_channels=channels)
        model_config.segmentation_input = cfg.segmentation_input
        if cfg.standardize:
            model_config.input_mean, model_config.input_std = standardization(images)
        model_config = ModelConfig.from_dict(model_config.to_dict())  # re-checked
    device = torch.device(cfg.device)
    precision, precision_reason = choose_precision(cfg.precision, device)
    step_cfg = dataclasses.replace(cfg, precision=precision)  # cfg keeps what was asked for (a resume re-checks)
    layout = memory_format(cfg.memory_format, device, precision)
    model = DiffusionAD(model_config).to(device, memory_format=layout)  # before the optimiser: its state follows
    if cfg.crop is not None:
        multiple = max(2 ** (len(model_config.unet.channel_mults) - 1), model.segmentation.min_size_multiple)
        if cfg.crop % multiple or cfg.crop > model_config.image_size:
            raise ValueError(f"--crop {cfg.crop}: must be a multiple of {multiple} and at most the input size "
                             f"{model_config.image_size} for the {model_config.name} preset")
    optimizer = make_optimizer(model, cfg)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    start_step = ckpt.load_training_state(state_path, model, optimizer, ema.model if ema else None) if state_path else 0
    if state_path:
        log.info("resuming from %s at step %d", state_path, start_step)
    best_score = -math.inf
    if state_path and (run_dir / BEST_FILE).is_file():
        best_score = float(ckpt.read_metadata(run_dir / BEST_FILE).get("validation_score", "-inf"))
    (run_dir / ckpt.CONFIG_FILE).write_text(json.dumps(
        {"model": model_config.to_dict(), "train": asdict(cfg), "data_dir": str(data_dir),
         "num_train_images": len(paths), "validation": vset.source if vset else None,
         "held_out_images": held_paths}, indent=2))

    cost = describe(model)
    log.info("model %s: %d px, %d channel(s), UNet %.2f M params, segmentation %.2f M, %.2f GMAC per image",
             model_config.name, model_config.image_size, channels, cost["unet_params_m"],
             cost["segmentation_params_m"], cost["pipeline_gmac_per_image"])
    log.info("precision %s (%s), memory layout %s", precision, precision_reason, layout_name(layout))
    per_step = cfg.batch_size * cfg.crops_per_image
    log.info("%d training images from %s; %d image(s) x %d crop(s) of %s px per step, lr %.0e / %.0e (%s), "
             "EMA %s, %d loader worker(s)", len(paths), data_dir, cfg.batch_size, cfg.crops_per_image,
             cfg.crop or model_config.image_size, cfg.unet_lr, cfg.segmentation_lr, cfg.lr_schedule,
             cfg.ema_decay or "off", cfg.workers)
    log.info("validation: %s", f"{vset.source}, {len(vset)} images with their synthetic anomalies" if vset
             else "none (too few images): the last averaged weights are kept")

    dataset = SyntheticAnomalyDataset(images, foregrounds, AnomalySynthesizer(cfg.synthesis), cfg.crop,
                                      cfg.crops_per_image)
    loader = DataLoader(dataset, batch_size=cfg.batch_size,
                        sampler=ResumableSampler(len(dataset), cfg.seed, start_step * cfg.batch_size),
                        num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                        prefetch_factor=4 if cfg.workers > 0 else None)
    bn_images = images[:64]  # good whole images for BatchNorm re-estimation (a fixed subset: deterministic)

    def check(step: int) -> dict:
        """Validate the averaged model (its BatchNorm re-estimated) and keep it when it is the best so far."""
        nonlocal best_score
        candidate = ema.model if ema else copy.deepcopy(model)
        reestimate_batchnorm(candidate, bn_images)
        result = validate(candidate, vset)
        if result["score"] > best_score:
            best_score = result["score"]
            ckpt.save_model(run_dir / BEST_FILE, candidate, {"step": step, "validation_score": best_score,
                                                             "validation": json.dumps(result)})
        validations.append({"step": step, **result})
        with (run_dir / VALIDATION_LOG).open("a") as f:
            f.write(json.dumps(validations[-1]) + "\n")
        return result

    model.train()
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes is not None else math.inf
    end_step = cfg.max_steps if cfg.max_steps is not None else None
    started = time.monotonic()
    step, history, losses, validations = start_step, [], {}, []
    bar = tqdm(total=end_step, initial=start_step, desc="training", unit="step", disable=not progress)
    log_file = (run_dir / "train_log.jsonl").open("a")
    try:
        for images_b, masks_b, has_b in loader:
            if end_step is not None and step >= end_step:
                break
            if time.monotonic() - started >= budget_s:
                log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, step)
                break
            # Seeded by step: a resumed run draws the same timesteps and noise.
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            factor = lr_factor(cfg, step, budget_progress(step, end_step, time.monotonic() - started, budget_s))
            for group, base_lr in zip(optimizer.param_groups, (cfg.unet_lr, cfg.segmentation_lr), strict=True):
                group["lr"] = base_lr * factor
            images_b, masks_b = (t.flatten(0, 1).to(device, memory_format=layout) for t in (images_b, masks_b))
            has_b = has_b.flatten().to(device)
            out = training_step(model, images_b, masks_b, has_b, step_cfg, generator)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            step += 1
            if ema:
                ema.update(model, step)
            losses = {k: float(v.detach()) for k, v in out.items()}
            history.append(losses)
            bar.update(1)
            if step % cfg.log_every == 0:
                mean = {k: float(np.mean([h[k] for h in history[-cfg.log_every:]])) for k in losses}
                bar.set_postfix({k: f"{v:.4f}" for k, v in mean.items()})
                log_file.write(json.dumps({"step": step, "elapsed_s": round(time.monotonic() - started, 1),
                                           "lr_factor": round(factor, 4), **mean}) + "\n")
                log_file.flush()
            if vset is not None and step % cfg.validate_every == 0:
                result = check(step)
                log.debug("step %d validation %s", step, result)
                bar.set_description(f"training (val {result['score']:.3f}, best {best_score:.3f})")
                model.train()
            if step % cfg.checkpoint_every == 0:
                _save_checkpoint(run_dir, model, optimizer, step, cfg.keep_checkpoints, ema)
    finally:
        bar.close()
        log_file.close()

    elapsed = time.monotonic() - started
    _save_checkpoint(run_dir, model, optimizer, step, cfg.keep_checkpoints, ema)
    if vset is not None and step % cfg.validate_every != 0:
        check(step)

    # The model kept: the best validated one, else the averaged (or raw) weights; BatchNorm re-estimated.
    if vset is not None and (run_dir / BEST_FILE).is_file():
        final = ckpt.load_model(run_dir / BEST_FILE).to(device, memory_format=layout)
        chosen_step = int(ckpt.read_metadata(run_dir / BEST_FILE)["step"])
    else:
        final, chosen_step = copy.deepcopy(ema.model if ema else model), step
    reestimate_batchnorm(final, images[:128])
    t_s_selection = select_t_s(final, vset, cfg.t_s_candidates) if vset is not None else None
    sigma_selection = None
    if cfg.map_sigma_candidates is not None and len(cfg.map_sigma_candidates) == 1:
        final.set_map_sigma(cfg.map_sigma_candidates[0])  # the user's: nothing to choose
        log.info("map smoothing fixed at sigma %g, not chosen on validation", final.config.map_sigma)
    elif vset is not None:
        sigma_selection = select_map_sigma(final, vset, cfg.map_sigma_candidates or
                                           map_sigma_candidates(final.config.map_sigma))
    score_selection = None
    if vset is not None:  # last: the reference is of the maps that the chosen t_s and smoothing make
        fit_map_reference(final, images[:REFERENCE_IMAGES])
        score_selection = select_score_rule(final, vset)
    final.eval().cpu()
    recent = history[-50:]
    summary = {
        "preset": model_config.name,
        "steps": step,
        "steps_this_run": step - start_step,
        "chosen_step": chosen_step,
        "train_seconds": round(elapsed, 1),
        "seconds_per_step": round(elapsed / max(step - start_step, 1), 3),
        "images_seen": step * per_step,
        "num_train_images": len(paths),
        "crop": cfg.crop,
        "crops_per_image": cfg.crops_per_image,
        "precision": precision,
        "precision_reason": precision_reason,
        "memory_format": layout_name(layout),
        "final_losses": {k: float(np.mean([h[k] for h in recent])) for k in recent[0]} if recent else {},
        "image_size": model_config.image_size,
        "in_channels": channels,
        "t_s": final.config.t_s,
        "map_sigma": final.config.map_sigma,
        "score": {"top_k": final.config.top_k, "map_reference": final.config.score_reference},
        "validation": {"source": vset.source, "images": len(vset), "chosen": max(validations, key=_score)
                       if validations else None, "history": validations, "t_s_selection": t_s_selection,
                       "map_sigma_selection": sigma_selection, "score_rule": score_selection}
        if vset is not None else None,
        **{k: round(v, 3) for k, v in cost.items()},
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": str(device) if device.type == "cpu" else f"{device}: {torch.cuda.get_device_name(device)}",
    }
    ckpt.save_model(run_dir / ckpt.MODEL_FILE, final, {"step": chosen_step, "training": json.dumps(summary)})
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    log.info("trained %d steps in %.1f min (%.2f s/step); kept step %d, t_s %d, map sigma %g, image score %s; "
             "model saved to %s", step, elapsed / 60, summary["seconds_per_step"], chosen_step, final.config.t_s,
             final.config.map_sigma, rule_name(final.config.score_reference, final.config.top_k),
             run_dir / ckpt.MODEL_FILE)
    return summary


def _score(result: dict) -> float:
    return result["score"]


def select_t_s(model: DiffusionAD, vset: ValidationSet, candidates: tuple[int, ...]) -> dict:
    """Set model.config.t_s to the candidate with the best validation score (ties: the earlier candidate,
    the paper's 200 if listed first among equals); returns every candidate's score."""
    default = model.config.t_s
    scores = {}
    for t_s in sorted({*candidates, default}):
        if not 0 <= t_s < model.config.t_l:
            continue
        model.config.t_s = t_s
        scores[t_s] = validate(model, vset)["score"]
    best = max(scores, key=lambda t: (scores[t], t == default))
    model.config.t_s = best
    return {"chosen": best, "scores": {str(t): round(v, 4) for t, v in scores.items()}}


@torch.inference_mode()
def select_map_sigma(model: DiffusionAD, vset: ValidationSet, candidates: tuple[float, ...]) -> dict:
    """Set the map smoothing to the candidate with the best validation score (ties: the model's own, if a
    candidate, else the least smoothing).

    Small defects (a few pixels) fade under a wide blur, coarse masks want one: the category decides. The
    network runs once; each candidate only smooths its maps again.
    """
    default = model.config.map_sigma
    model.set_map_sigma(0.0)
    raw, _ = predict(model, vset.images, progress=False)
    raw = torch.from_numpy(raw)[:, None]
    scores = {}
    for sigma in sorted(set(candidates)):
        maps = smooth_map_at(raw, sigma)
        scores[sigma] = validation_metrics(vset, maps[:, 0].numpy(), model.score(maps).numpy())["score"]
    best = max(scores, key=lambda s: (scores[s], s == default))
    model.set_map_sigma(best)
    return {"chosen": best, "scores": {f"{s:g}": round(v, 4) for s, v in scores.items()}}


@torch.inference_mode()
def fit_map_reference(model: DiffusionAD, images: np.ndarray) -> None:
    """Fit the score's map reference on the maps of good training images [N, H, W, C]."""
    model.map_reference.fit(0, torch.from_numpy(predict(model, images, progress=False)[0])[:, None])


def select_score_rule(model: DiffusionAD, vset: ValidationSet) -> dict:
    """Choose the image score's rule on the validation set by its image AUROC (training/score_rule.py; ties:
    the mean of the model's own top_k of the map). The map does not change: the networks run once."""
    maps, _ = predict(model, vset.images, progress=False)
    device = model.noise.device
    return choose_score_rule(model, {"category": maps}, {"category": vset.labels},
                             lambda _, m: model.score(m.to(device)).cpu(), (False, model.config.top_k))


def map_sigma_candidates(default: float) -> tuple[float, ...]:
    """None, half, the preset's and twice the preset's smoothing."""
    return (0.0, default / 2, default, default * 2) if default > 0 else (0.0,)


def _save_checkpoint(run_dir: Path, model, optimizer, step: int, keep: int, ema: EMA | None = None) -> None:
    path = run_dir / ckpt.CHECKPOINT_DIR / f"step_{step:07d}.safetensors"
    ckpt.save_training_state(path, model, optimizer, step, ema=ema.model if ema else None)
    for old in sorted(path.parent.glob("step_*.safetensors"))[:-keep]:
        old.unlink()


def _train_config_from_dict(d: dict) -> TrainConfig:
    d = dict(d)
    synthesis = d.pop("synthesis")
    synthesis = SynthesisConfig(**{**synthesis, "opacity_range": tuple(synthesis["opacity_range"]),
                                   "sources": tuple(synthesis["sources"])})
    if "bf16" in d:  # runs from before --precision
        d["precision"] = "auto" if d.pop("bf16") else "fp32"
    if "t_s_candidates" in d:
        d["t_s_candidates"] = tuple(d["t_s_candidates"])
    if d.get("map_sigma_candidates") is not None:
        d["map_sigma_candidates"] = tuple(d["map_sigma_candidates"])
    return TrainConfig(**{**d, "t_s_range": tuple(d["t_s_range"]), "t_l_range": tuple(d["t_l_range"])},
                       synthesis=synthesis)

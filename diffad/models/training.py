"""Joint training of the reconstruction UNet and the segmentation network (DiffusionAD).

One step on a batch of good images, about half of them given a synthetic anomaly:
1. noise every image at a small step t_s ~ U{0..299} and a large one t_l ~ U{300..999}; the UNet
   predicts both noises in one batched call; MSE counts only the images without an anomaly;
2. the norm-guided one-step reconstruction from the two predictions goes, with the image, into the
   segmentation network: 5 x focal loss (gamma 4) + smooth L1 against the synthetic mask.
"""

from __future__ import annotations

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

from . import checkpoint as ckpt
from .data import detect_channels, find_train_images, read_images
from .diffusionad import DiffusionAD, ModelConfig
from .presets import describe, preset
from .synthesis import AnomalySynthesizer, SynthesisConfig, estimate_foreground

log = logging.getLogger("diffad.train")

# The paper trains for 3000 epochs with these rates; a budget of minutes on a CPU needs larger ones.
LEARNING_RATES = {"paper": (1e-4, 1e-5), "small": (1e-3, 1e-3), "tiny": (2e-3, 2e-3)}


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
    focal_gamma: float = 4.0
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    workers: int = 1
    bf16: bool = True
    device: str = "cpu"    # "cuda" trains on the GPU; timesteps and noise are still drawn on the CPU (same run)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)


# --- data ----------------------------------------------------------------------------------------
class SyntheticAnomalyDataset(Dataset):
    """Good images in memory; each item gets (or not) a synthetic anomaly drawn from its own seed."""

    def __init__(self, images: np.ndarray, foregrounds: np.ndarray | None, synthesizer: AnomalySynthesizer):
        self.images, self.foregrounds, self.synthesizer = images, foregrounds, synthesizer

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        index, sample_seed = key
        rng = np.random.default_rng(sample_seed)
        fg = self.foregrounds[index] if self.foregrounds is not None else None
        image, mask, has_anomaly = self.synthesizer(self.images[index], rng, fg)
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy(mask)[None], torch.tensor(float(has_anomaly)))


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
    """The joint loss for one batch; images in [0, 1], masks [N, 1, H, W] in {0, 1}."""
    sched, n, device = model.schedule, images.shape[0], images.device
    x = images * 2.0 - 1.0
    # Drawn on the CPU from the step's generator, then moved: the same numbers on any device.
    t_s = torch.randint(*cfg.t_s_range, (n,), generator=generator).to(device)
    t_l = torch.randint(*cfg.t_l_range, (n,), generator=generator).to(device)
    t = torch.cat([t_s, t_l])
    noise = torch.randn((2 * n, *x.shape[1:]), generator=generator).to(device)
    x_t = sched.q_sample(torch.cat([x, x]), t, noise)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        eps = model.unet(x_t, t).float()

    # Noise loss on the clean images only: the UNet must learn what normal looks like.
    clean = (1.0 - has_anomaly).repeat(2)
    per_sample = (eps - noise).pow(2).flatten(1).mean(1)
    noise_loss = (per_sample * clean).sum() / clean.sum().clamp(min=1.0)

    x0_s = sched.predict_x0(x_t[:n], t_s, eps[:n])
    x0_l = sched.predict_x0(x_t[n:], t_l, eps[n:]).clamp(-1.0, 1.0)
    x0_g = sched.guided_x0(x0_s, x0_l, t_s, model.config.w)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        logits = model.segment(x, x0_g).float()
    focal = focal_loss(logits, masks, cfg.focal_gamma)
    smooth_l1 = F.smooth_l1_loss(torch.sigmoid(logits), masks)
    loss = noise_loss + cfg.focal_weight * focal + smooth_l1
    return {"loss": loss, "noise": noise_loss.detach(), "focal": focal.detach(), "smooth_l1": smooth_l1.detach()}


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
            cfg.synthesis = _train_config_from_dict(saved["train"]).synthesis
        image_size, channels = model_config.image_size, model_config.in_channels
    else:
        cfg = train_config or TrainConfig()
    if cfg.max_steps is None and cfg.max_minutes is None:
        raise ValueError("give a budget: max_steps, max_minutes or both")

    torch.manual_seed(cfg.seed)
    paths, images, foregrounds, channels = load_training_images(
        data_dir, image_size or preset(preset_name).image_size, channels, cfg.synthesis.foreground)
    if state_path is None:
        model_config = preset(preset_name, image_size=images.shape[1], in_channels=channels)
    device = torch.device(cfg.device)
    model = DiffusionAD(model_config).to(device)  # before the optimiser: a resumed state follows its parameters
    optimizer = make_optimizer(model, cfg)
    start_step = ckpt.load_training_state(state_path, model, optimizer) if state_path else 0
    if state_path:
        log.info("resuming from %s at step %d", state_path, start_step)
    (run_dir / ckpt.CONFIG_FILE).write_text(json.dumps(
        {"model": model_config.to_dict(), "train": asdict(cfg), "data_dir": str(data_dir),
         "num_train_images": len(paths)}, indent=2))

    cost = describe(model)
    log.info("model %s: %d px, %d channel(s), UNet %.2f M params, segmentation %.2f M, %.2f GMAC per image",
             model_config.name, model_config.image_size, channels, cost["unet_params_m"],
             cost["segmentation_params_m"], cost["pipeline_gmac_per_image"])
    log.info("%d training images from %s; batch %d, lr %.0e / %.0e (%s), bf16 %s, %d loader worker(s)",
             len(paths), data_dir, cfg.batch_size, cfg.unet_lr, cfg.segmentation_lr, cfg.lr_schedule, cfg.bf16,
             cfg.workers)

    dataset = SyntheticAnomalyDataset(images, foregrounds, AnomalySynthesizer(cfg.synthesis))
    loader = DataLoader(dataset, batch_size=cfg.batch_size,
                        sampler=ResumableSampler(len(dataset), cfg.seed, start_step * cfg.batch_size),
                        num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                        prefetch_factor=4 if cfg.workers > 0 else None)

    model.train()
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes is not None else math.inf
    end_step = cfg.max_steps if cfg.max_steps is not None else None
    started = time.monotonic()
    step, history, losses = start_step, [], {}
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
            out = training_step(model, images_b.to(device), masks_b.to(device), has_b.to(device), cfg, generator)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            step += 1
            losses = {k: float(v.detach()) for k, v in out.items()}
            history.append(losses)
            bar.update(1)
            if step % cfg.log_every == 0:
                mean = {k: float(np.mean([h[k] for h in history[-cfg.log_every:]])) for k in losses}
                bar.set_postfix({k: f"{v:.4f}" for k, v in mean.items()})
                log_file.write(json.dumps({"step": step, "elapsed_s": round(time.monotonic() - started, 1),
                                           "lr_factor": round(factor, 4), **mean}) + "\n")
                log_file.flush()
            if step % cfg.checkpoint_every == 0:
                _save_checkpoint(run_dir, model, optimizer, step, cfg.keep_checkpoints)
    finally:
        bar.close()
        log_file.close()

    elapsed = time.monotonic() - started
    _save_checkpoint(run_dir, model, optimizer, step, cfg.keep_checkpoints)
    model.eval().cpu()
    recent = history[-50:]
    summary = {
        "preset": model_config.name,
        "steps": step,
        "steps_this_run": step - start_step,
        "train_seconds": round(elapsed, 1),
        "seconds_per_step": round(elapsed / max(step - start_step, 1), 3),
        "images_seen": step * cfg.batch_size,
        "num_train_images": len(paths),
        "final_losses": {k: float(np.mean([h[k] for h in recent])) for k in recent[0]} if recent else {},
        "image_size": model_config.image_size,
        "in_channels": channels,
        **{k: round(v, 3) for k, v in cost.items()},
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": str(device) if device.type == "cpu" else f"{device}: {torch.cuda.get_device_name(device)}",
    }
    ckpt.save_model(run_dir / ckpt.MODEL_FILE, model, {"step": step, "training": json.dumps(summary)})
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    log.info("trained %d steps in %.1f min (%.2f s/step); model saved to %s",
             step, elapsed / 60, summary["seconds_per_step"], run_dir / ckpt.MODEL_FILE)
    return summary


def _save_checkpoint(run_dir: Path, model, optimizer, step: int, keep: int) -> None:
    path = run_dir / ckpt.CHECKPOINT_DIR / f"step_{step:07d}.safetensors"
    ckpt.save_training_state(path, model, optimizer, step)
    for old in sorted(path.parent.glob("step_*.safetensors"))[:-keep]:
        old.unlink()


def _train_config_from_dict(d: dict) -> TrainConfig:
    d = dict(d)
    synthesis = d.pop("synthesis")
    synthesis = SynthesisConfig(**{**synthesis, "opacity_range": tuple(synthesis["opacity_range"]),
                                   "sources": tuple(synthesis["sources"])})
    return TrainConfig(**{**d, "t_s_range": tuple(d["t_s_range"]), "t_l_range": tuple(d["t_l_range"])},
                       synthesis=synthesis)

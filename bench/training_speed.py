"""`diffad bench training`: seconds per training step of a preset on this machine, in each memory layout.

A 30-minute training budget buys steps, and steps buy quality (validation still climbs at the end of the
small preset's 30-minute runs), so the time of one step is what a CPU user waits on. This benchmark makes
the batches `diffad train` would make from DATA_DIR (the preset's crops, or whole images of a part on a
plain background; synthetic anomalies drawn from --seed), then times the same training steps (forward,
backward, optimiser) of two copies of one model, one in the default NCHW layout and one channels-last
(what training uses), interleaved step by step so that other load on the machine falls on both alike.
It also times making the batches (the synthetic anomalies, in this process) and one validation check.

The precision is training's choice (bf16 only where this CPU or GPU computes it natively; --precision
forces one). Prints one JSON object: the machine (CPU model and the flags that decide its speed), each
layout's median and spread of seconds per step, their ratio, and the steps a 30-minute budget buys.

    diffad bench training ../shared/datasets/dagm_class1 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import logging
import shlex
import statistics
import time
from datetime import datetime, timezone

log = logging.getLogger("diffad.bench.training")

LAYOUTS = ("contiguous", "channels_last")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", metavar="DATA_DIR", help="MVTec-layout category (its train/good images)")
    p.add_argument("--preset", choices=("tiny", "small", "paper"), default="small", help="default small")
    p.add_argument("--image-size", type=int, help="input size (default: the preset's)")
    p.add_argument("--crop", type=int, help="crop size, as `diffad train --crop` (default: the preset's; 0: whole "
                   "images)")
    p.add_argument("--crops-per-image", type=int, help="as `diffad train --crops-per-image`")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default 8, training's)")
    p.add_argument("--steps", type=int, default=8, help="steps timed per layout, after --warmup (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per layout first (default 2)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): training's choice, bf16 only where computed natively")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's, all cores)")
    p.add_argument("--budget-minutes", type=float, default=30.0,
                   help="the budget whose step count is reported (default 30)")
    p.add_argument("--seed", type=int, default=0, help="model and data seed (default 0)")
    p.add_argument("--json", help="also write the result to this file")


def _time_steps(models: dict, batches: list, cfg, warmup: int, steps: int) -> dict[str, list[float]]:
    """Each layout's seconds per step on the same batches, the layouts alternating step by step."""
    import torch

    from ..training.trainer import training_step

    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + steps):
        images, masks, has_anomaly = batches[i % len(batches)]
        for name, (model, optimizer) in models.items():
            layout = torch.channels_last if name == "channels_last" else torch.contiguous_format
            started = time.perf_counter()
            out = training_step(model, images.contiguous(memory_format=layout),
                                masks.contiguous(memory_format=layout), has_anomaly, cfg,
                                torch.Generator().manual_seed(i))
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            if images.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - started)
    return times


def run(args) -> int:
    import numpy as np
    import torch
    from torch.utils.data import default_collate

    from ..models.diffusionad import DiffusionAD
    from ..models.presets import preset
    from ..training.synthesis import AnomalySynthesizer
    from ..training.trainer import (
        ResumableSampler,
        SyntheticAnomalyDataset,
        TrainConfig,
        choose_precision,
        crop_setting,
        load_training_images,
        make_optimizer,
        make_validation_set,
        reestimate_batchnorm,
        shows_a_part,
        validate,
    )
    from .throughput import emit, machine

    if min(args.batch_size, args.steps) < 1 or args.warmup < 0 or args.budget_minutes <= 0:
        raise ValueError("--batch-size and --steps must be positive, --warmup 0 or more, --budget-minutes > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    crop, crops, whole_for_objects = crop_setting(args.preset, args.crop, args.crops_per_image)
    cfg = TrainConfig(batch_size=args.batch_size, crop=crop, crops_per_image=crops, seed=args.seed)
    _, images, foregrounds, channels = load_training_images(
        args.data_dir, args.image_size or preset(args.preset).image_size, None, cfg.synthesis.foreground)
    if whole_for_objects and crop is not None and shows_a_part(foregrounds):
        crop, crops = None, 1  # as `diffad train`: a part on a plain background trains on whole images
    precision, precision_reason = choose_precision(args.precision, device)
    cfg.precision = precision

    dataset = SyntheticAnomalyDataset(images, foregrounds, AnomalySynthesizer(cfg.synthesis), crop, crops)
    samples = iter(ResumableSampler(len(dataset), args.seed))
    count = min(args.warmup + args.steps, 10)  # batches reused in turn: the timing does not depend on them
    started = time.perf_counter()
    items = [dataset[next(samples)] for _ in range(count * args.batch_size)]
    data_seconds = (time.perf_counter() - started) / count
    batches = []
    for i in range(count):
        image_b, mask_b, has_b = default_collate(items[i * args.batch_size:(i + 1) * args.batch_size])
        batches.append((image_b.flatten(0, 1).to(device), mask_b.flatten(0, 1).to(device),
                        has_b.flatten().to(device)))

    torch.manual_seed(args.seed)
    config = preset(args.preset, image_size=images.shape[1], in_channels=channels)
    reference = DiffusionAD(config).to(device).train()
    models = {}
    for name in LAYOUTS:
        model = copy.deepcopy(reference)
        if name == "channels_last":
            model.to(memory_format=torch.channels_last)
        models[name] = (model, make_optimizer(model, cfg))
    log.info("%s preset, %d px, %s, batch %d x %d crop(s) of %s px: timing %d steps per layout (%s)",
             args.preset, config.image_size, precision, args.batch_size, crops, crop or config.image_size,
             args.steps, ", ".join(LAYOUTS))
    times = _time_steps(models, batches, cfg, args.warmup, args.steps)

    # One validation check as training makes it every 100 steps (BatchNorm re-estimated, 2 x 40 images).
    held = images[:40]
    vset = make_validation_set(held, foregrounds[:40] if foregrounds is not None else None, cfg.synthesis,
                               "benchmark")
    checked = models["channels_last"][0]
    started = time.perf_counter()
    reestimate_batchnorm(checked, images[:64])
    validate(checked, vset)
    validation_seconds = time.perf_counter() - started

    layouts = {}
    for name, values in times.items():
        median = statistics.median(values)
        layouts[name] = {"seconds_per_step_median": round(median, 4),
                         "seconds_per_step_min": round(min(values), 4),
                         "seconds_per_step_max": round(max(values), 4),
                         "steps_in_budget": int(args.budget_minutes * 60 / (median + validation_seconds / 100))}
    speedup = layouts["contiguous"]["seconds_per_step_median"] / layouts["channels_last"]["seconds_per_step_median"]
    emit({
        "benchmark": "training",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": getattr(args, "command", None) or shlex.join(["diffad", "bench", "training", args.data_dir]),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "data_dir": str(args.data_dir), "preset": args.preset, "image_size": config.image_size,
        "channels": channels, "device": str(device), "precision": precision, "precision_reason": precision_reason,
        "batch_size": args.batch_size, "crop": crop, "crops_per_image": crops,
        "samples_per_step": args.batch_size * crops, "steps_timed": args.steps, "warmup_steps": args.warmup,
        "layouts": layouts,
        "channels_last_speedup": round(speedup, 3),
        "data_seconds_per_batch": round(data_seconds, 4),
        "validation_check_seconds": round(validation_seconds, 2),
        "budget_minutes": args.budget_minutes,
        "note": "steps_in_budget: the budget over (median step + one validation check per 100 steps); the "
                "batches' synthesis runs in a loader worker beside training",
        "numpy": np.__version__,
    }, args.json)
    return 0

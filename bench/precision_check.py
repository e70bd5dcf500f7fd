"""Does training's bf16 forward matter for the map? One trained run, its validation set, both precisions.

Training runs the UNet and the segmentation network under bf16 autocast where the CPU computes bf16
natively; evaluation and export run in fp32. This scores the run's own validation set (its held-out good
images with the fixed-seed synthetic anomalies, as training builds it) both ways, side by side in one
process, and prints the map and noise-prediction differences and both sets of validation metrics:

    python bench/precision_check.py runs/bench/dagm_class1_small_seed0 ../shared/datasets/dagm_class1
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from diffad.benchmarks.throughput import emit, machine
from diffad.models import checkpoint as ckpt
from diffad.training.trainer import run_validation_set, validate

from diffad.hardware import cpu_computes_bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    model = ckpt.load_model(args.run_dir).eval()
    vset = run_validation_set(args.run_dir, args.data_dir, model.config.image_size, model.config.in_channels)
    batch = torch.from_numpy(np.ascontiguousarray(vset.images[:16].transpose(0, 3, 1, 2)))
    with torch.no_grad():
        x = model.normalize(batch)
        t = torch.full((len(x),), model.config.t_s)
        eps32 = model.unet(x, t)
        map32 = model(batch)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eps16 = model.unet(x, t).float()
            map16 = model(batch)[0].float()
    fp32 = validate(model, vset)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = validate(model, vset)
    rms = lambda a, b: float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())  # noqa: E731
    out = {"run": str(args.run_dir), "validation_images": len(vset), "t_s": model.config.t_s,
           "noise_prediction_relative_rms_difference": rms(eps16, eps32),
           "map_max_abs_difference": float((map16 - map32).abs().max()),
           "map_relative_rms_difference": rms(map16, map32),
           "validation_fp32": fp32, "validation_bf16": bf16,
           "native_bf16": cpu_computes_bf16(), "machine": machine()}
    emit({"command": shlex.join(["python", *sys.argv]), **out}, args.json)


if __name__ == "__main__":
    main()

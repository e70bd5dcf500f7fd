"""What limits a trained run's pixel figures on a category's test set: the map's smoothing and the masks' rims.

- **Smoothing.** Training chooses the map's Gaussian smoothing on the validation set, whose synthetic
  anomalies have exact masks. This scores the maps of both sets at every candidate sigma (the network runs
  once per set), so what the choice saw and what it cost on real masks show side by side.
- **Rims.** Some datasets mark a defect with a coarse shape (DAGM: an ellipse around it) whose rim holds
  normal-looking pixels. This scores the model's own maps with a band of `w` pixels (at the model's input
  size) on either side of each mask's boundary left out: the defect's core against the surface away from
  it. A pixel AUROC that climbs steeply with `w` says the ranking fails at the rims (a coarse mask, or a
  blurred map: this cannot tell which); a flat one says the map misses the defects themselves.

It reads test labels to explain figures, never to choose anything.

    python bench/pixel_limits.py RUN DATA [--json OUT]
    python bench/pixel_limits.py --table RESULT.json [RESULT.json ...]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from diffad.benchmarks.quality import mean_std_cell
from diffad.benchmarks.score_rules import parse_run_or_table
from diffad.benchmarks.throughput import emit, machine
from diffad.evaluation.evaluate import predict, read_test_set
from diffad.evaluation.metrics import aupro, pixel_ap, pixel_auroc
from diffad.models import checkpoint as ckpt
from diffad.models.diffusionad import smooth_map_at
from diffad.models.presets import map_sigma_for
from diffad.training.trainer import map_sigma_candidates, run_validation_set
from skimage.morphology import dilation, disk, erosion
from sklearn.metrics import roc_auc_score

BANDS = (0, 1, 2, 4, 8)


def boundary_band(masks: np.ndarray, width: int) -> np.ndarray:
    """[N, H, W] bool: the pixels within `width` of a mask's boundary, inside or outside it."""
    band = np.zeros(masks.shape, dtype=bool)
    if width == 0:
        return band
    footprint = disk(width)
    for i, mask in enumerate(masks.astype(bool)):
        if mask.any():
            band[i] = dilation(mask, footprint) & ~erosion(mask, footprint)
    return band


def pixel_auroc_without_band(masks: np.ndarray, maps: np.ndarray, width: int) -> dict[str, float]:
    """Pixel AUROC over every pixel outside the band, and the share of defect pixels left in."""
    keep = ~boundary_band(masks, width)
    defect = masks.astype(bool)
    return {"pixel_auroc": float(roc_auc_score(defect[keep], maps[keep])),
            "defect_pixels_kept": float((defect & keep).sum() / max(defect.sum(), 1))}


def smoothed(raw: np.ndarray, sigma: float) -> np.ndarray:
    """[N, H, W] maps smoothed as the model smooths its own."""
    return smooth_map_at(torch.from_numpy(raw)[:, None], sigma)[:, 0].numpy()


def table(paths: list[str]) -> None:
    """Per smoothing: the runs' validation and test pixel figures (mean ± std), and how many runs had it."""
    results = [json.loads(Path(path).read_text()) for path in paths]
    columns = ("validation_pixel_auroc", "validation_pixel_ap", "pixel_auroc", "pixel_aupro", "pixel_ap")
    print("| map sigma | runs that chose it | validation pixel AUROC | validation pixel AP | test pixel AUROC "
          "| test AUPRO | test pixel AP |")
    print("|---|---|" + "---|" * len(columns))
    sigmas = sorted({sigma for r in results for sigma in r["by_map_sigma"]}, key=float)
    for sigma in sigmas:
        rows = [r["by_map_sigma"][sigma] for r in results if sigma in r["by_map_sigma"]]
        own = sum(f"{r['model_map_sigma']:g}" == sigma for r in results)
        cells = [mean_std_cell(np.array([row[c] for row in rows if c in row])) for c in columns]
        print(f"| {sigma} | {own} of {len(results)} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?")
    parser.add_argument("data_dir", nargs="?")
    parser.add_argument("--table", nargs="+", metavar="RESULT", help="summarise results of this script instead")
    parser.add_argument("--bands", default=",".join(map(str, BANDS)),
                        help=f"band widths in pixels at the model's input size (default {','.join(map(str, BANDS))})")
    args = parse_run_or_table(parser, argv)
    if args.table:
        return table(args.table)
    widths = sorted({int(w) for w in args.bands.split(",")})

    model = ckpt.load_model(args.run_dir)
    own_sigma = model.config.map_sigma
    test = read_test_set(args.data_dir, model.config.image_size, model.config.in_channels)
    vset = run_validation_set(args.run_dir, args.data_dir, model.config.image_size, model.config.in_channels)
    model.set_map_sigma(0.0)
    raw, _ = predict(model, test.images, desc="test set")
    raw_validation = predict(model, vset.images, desc="validation")[0] if vset is not None else None
    # the candidates training chooses among at this input size, and the model's own
    sigmas = sorted({*map_sigma_candidates(map_sigma_for(model.config.image_size)), own_sigma})
    by_sigma = {}
    for sigma in sigmas:
        maps = smoothed(raw, sigma)
        figures = {"pixel_auroc": pixel_auroc(test.masks, maps), "pixel_aupro": aupro(test.masks, maps),
                   "pixel_ap": pixel_ap(test.masks, maps)}
        if raw_validation is not None:
            maps = smoothed(raw_validation, sigma)
            figures |= {"validation_pixel_auroc": pixel_auroc(vset.masks, maps),
                        "validation_pixel_ap": pixel_ap(vset.masks, maps)}
        by_sigma[f"{sigma:g}"] = figures
        print(f"sigma {sigma:g}{' (the model)' if sigma == own_sigma else ''}: " +
              ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    own = smoothed(raw, own_sigma)
    bands = {str(w): pixel_auroc_without_band(test.masks, own, w) for w in widths}
    for w, r in bands.items():
        print(f"band {w:>2} px left out: pixel AUROC {r['pixel_auroc']:.3f} "
              f"({r['defect_pixels_kept']:.0%} of defect pixels kept)")
    emit({"command": shlex.join(["python", *sys.argv]), "run": str(args.run_dir), "data": str(args.data_dir),
          "image_size": model.config.image_size, "test_images": len(test.labels), "model_map_sigma": own_sigma,
          "by_map_sigma": by_sigma, "bands": bands, "machine": machine()}, args.json)


if __name__ == "__main__":
    main()

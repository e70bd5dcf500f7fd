"""Where does a model's image score come from? A diagnosis, never a way to choose anything.

For each test image: the share of the top-k map values (those the image score averages) that lie on the
background (outside the estimated foreground), in a 3 px band along the part's outline, or inside the part,
for good and for defective images; and the image AUROC the score would have over the foreground only, or
inside it only; and whether the test's good parts score as the held-out good training images do (an image
AUROC of 0.5 between them: no shift from training to test, so the scores' overlap is the model's). It reads
test labels, so its figures explain a result; they must not pick a setting
(choose on the validation set: `diffad train` does).

    python bench/score_location.py runs/bench/mvtec3d_tire_small_seed0 ../shared/datasets/mvtec3d_tire [--json OUT]
"""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np
from diffad.benchmarks.throughput import emit, machine
from diffad.evaluation.evaluate import predict
from diffad.models import checkpoint as ckpt
from diffad.training.data import find_test_samples, read_image
from diffad.training.synthesis import estimate_foreground
from diffad.training.trainer import run_validation_set
from scipy import ndimage
from sklearn.metrics import roc_auc_score


def top_k_mean(values: np.ndarray, k: int) -> float:
    return float(np.sort(values)[-k:].mean()) if values.size else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("data_dir")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()

    model = ckpt.load_model(args.run_dir)
    cfg, k = model.config, model.config.top_k
    samples = find_test_samples(args.data_dir)
    images = np.stack([read_image(s.path, cfg.image_size, cfg.in_channels) for s in samples])
    labels = np.array([s.label for s in samples])
    maps, scores = predict(model, images, progress=False)
    part = np.stack([estimate_foreground(im) for im in images])
    band = np.stack([p ^ ndimage.binary_erosion(p, iterations=3) for p in part])

    shares = {"background": [], "outline band": [], "inside": []}
    for amap, p, b in zip(maps, part, band, strict=True):
        top = np.argsort(amap.ravel())[-k:]
        p, b = p.ravel()[top], b.ravel()[top]
        shares["background"].append((~p).mean())
        shares["outline band"].append(b.mean())
        shares["inside"].append((p & ~b).mean())
    held_out = run_validation_set(args.run_dir, args.data_dir, cfg.image_size, cfg.in_channels)
    held_out_scores = predict(model, held_out.images[held_out.labels == 0], progress=False)[1]

    def against_held_out(test_scores: np.ndarray) -> float:
        both = np.concatenate([held_out_scores, test_scores])
        return float(roc_auc_score(np.r_[np.zeros(len(held_out_scores)), np.ones(len(test_scores))], both))

    out = {"command": shlex.join(["python", *sys.argv]), "run": args.run_dir, "top_k": k, "images": len(samples),
           "top_k_share": {where: {"good": float(np.mean(np.array(v)[labels == 0])),
                                   "defective": float(np.mean(np.array(v)[labels == 1]))}
                           for where, v in shares.items()},
           "image_auroc": {
               "score (top-k over the whole map)": float(roc_auc_score(labels, scores)),
               "top-k over the foreground": float(roc_auc_score(
                   labels, [top_k_mean(m[p], k) for m, p in zip(maps, part, strict=True)])),
               "top-k inside the part (no outline band)": float(roc_auc_score(
                   labels, [top_k_mean(m[p & ~b], k) for m, p, b in zip(maps, part, band, strict=True)])),
               "test good against held-out good": against_held_out(scores[labels == 0]),
               "test defective against held-out good": against_held_out(scores[labels == 1])},
           "held_out_good_images": int(len(held_out_scores))}
    emit({**out, "machine": machine()}, args.json)


if __name__ == "__main__":
    main()

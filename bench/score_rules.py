"""Image-score rules compared on one trained run, from the maps the model already makes.

The rules: the map's maximum (DeCo-Diff's paper), the mean of the map's k largest values (DiffusionAD's
rule, k = 50 there), and the map's mean; each also on the map less the per-pixel mean map of training
images ("centred": what every good part shows at a place, such as an object's rim, stops counting) and on
its z against their per-pixel mean and std ("z": the model's own models/map_reference.py, whose rules
DeCo-Diff's training chooses among). Each gets its image AUROC on the run's validation set (held-out good
images with fixed synthetic anomalies: what a choice may look at) and on the category's test set
(reported only, never chosen on).

    python bench/score_rules.py RUN DATA [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from diffad.benchmarks.throughput import emit, machine
from diffad.evaluation.evaluate import predict, read_test_set
from diffad.evaluation.metrics import image_auroc
from diffad.models import checkpoint as ckpt
from diffad.models.map_reference import MapReference
from diffad.training.data import find_validation_images
from diffad.training.trainer import holdout_split, load_training_images, run_validation_set

TOP_K = (10, 50, 200, 1000)


def rule_scores(maps: np.ndarray, top_ks: tuple[int, ...] = TOP_K) -> dict[str, np.ndarray]:
    """[N, H, W] maps -> {rule name: [N] scores}."""
    flat = np.sort(maps.reshape(len(maps), -1), axis=1)[:, ::-1]
    rules = {"max": flat[:, 0]}
    for k in sorted(set(top_ks) - {1}):
        rules[f"top-{k} mean"] = flat[:, :k].mean(axis=1)
    rules["mean"] = flat.mean(axis=1)
    return rules


def reference_maps(run_dir: str, data_dir: str, model, count: int) -> np.ndarray:
    """The maps of up to `count` training images (never the held-out validation ones)."""
    fraction = json.loads((Path(run_dir) / ckpt.CONFIG_FILE).read_text())["train"]["validation_fraction"]
    _, images, _, _ = load_training_images(data_dir, model.config.image_size, model.config.in_channels, "none")
    keep = np.arange(len(images))
    if not find_validation_images(data_dir):
        keep = np.setdiff1d(keep, holdout_split(len(images), fraction))
    return predict(model, images[keep[:count]], desc="reference (training images)")[0]


def all_rules(maps: np.ndarray, reference: MapReference, top_ks: tuple[int, ...] = TOP_K) -> dict[str, np.ndarray]:
    """Every rule on [N, H, W] maps, against a reference fitted for category 0."""
    maps_t = torch.from_numpy(maps)[:, None]
    z = reference(maps_t, torch.zeros(len(maps), dtype=torch.long))[:, 0].numpy()
    rules = rule_scores(maps, top_ks)
    rules |= {f"centred {k}": v for k, v in rule_scores(maps - reference.mean[0, 0].numpy(), top_ks).items()}
    rules |= {f"z {k}": v for k, v in rule_scores(z, top_ks).items()}
    return rules


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("data_dir")
    parser.add_argument("--reference", type=int, default=64, metavar="N",
                        help="training images whose per-pixel map mean and std centre the map (default 64)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)

    model = ckpt.load_model(args.run_dir)
    size, channels = model.config.image_size, model.config.in_channels
    vset = run_validation_set(args.run_dir, args.data_dir, size, channels)
    if vset is None:
        sys.exit(f"{args.run_dir} has no validation set to choose a rule on")
    test = read_test_set(args.data_dir, size, channels)
    reference_images = reference_maps(args.run_dir, args.data_dir, model, args.reference)
    reference = MapReference(1, size)
    reference.fit(0, torch.from_numpy(reference_images)[:, None])
    validation_maps, _ = predict(model, vset.images, desc="validation")
    test_maps, _ = predict(model, test.images, desc="test set")
    top_ks = (*TOP_K, model.config.top_k)  # the model's own rule among them
    validation = {k: image_auroc(vset.labels, v) for k, v in all_rules(validation_maps, reference, top_ks).items()}
    test_figures = {k: image_auroc(test.labels, v) for k, v in all_rules(test_maps, reference, top_ks).items()}
    for rule in validation:
        print(f"{rule:>26}: validation image AUROC {validation[rule]:.3f}   test {test_figures[rule]:.3f}")
    best = max(validation, key=validation.get)
    print(f"validation would choose: {best}")
    emit({"command": shlex.join(["python", *sys.argv]), "run": str(args.run_dir), "data": str(args.data_dir),
          "validation_images": len(vset), "test_images": len(test.labels), "reference_images": len(reference_images),
          "model_rule": ("z " if getattr(model.config, "score_reference", False) else "")
          + ("max" if model.config.top_k == 1 else f"top-{model.config.top_k} mean"),
          "validation_image_auroc": validation, "test_image_auroc": test_figures,
          "validation_choice": best, "machine": machine()}, args.json)


if __name__ == "__main__":
    main()

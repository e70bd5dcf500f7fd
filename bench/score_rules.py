"""Image-score rules compared on one trained run, from the maps the model already makes.

The rules: the map's maximum (DeCo-Diff's paper), the mean of the map's k largest values (DiffusionAD's
rule, k = 50 there), and the map's mean; each also on the map less the per-pixel mean map of training
images ("centred": what every good part shows at a place, such as an object's rim, stops counting) and on
its z against their per-pixel mean and std ("z": the model's own models/map_reference.py, whose rules
DeCo-Diff's training chooses among). Each gets its image AUROC on the run's validation set (held-out good
images with fixed synthetic anomalies: what a choice may look at) and on the category's test set
(reported only, never chosen on).

The model's own candidates (training/score_rule.py: the maximum, the top-10, top-50 and its own top-k means,
each of the map or of z) are marked apart: "candidate_choice" is what training chooses among them (ties: the
method's own rule, "default_rule"), so its test figure against the default's is what that choice is worth.
`--table` puts several results side by side, per category, with the mean and std over the runs.

    python bench/score_rules.py RUN DATA [--json OUT]
    python bench/score_rules.py --table RESULT.json [RESULT.json ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from diffad.benchmarks.quality import mean_std_cell
from diffad.benchmarks.throughput import emit, machine
from diffad.evaluation.evaluate import predict, read_test_set
from diffad.evaluation.metrics import image_auroc
from diffad.models import checkpoint as ckpt
from diffad.models.map_reference import MapReference
from diffad.training.data import find_validation_images
from diffad.training.score_rule import best_rule, candidate_rules
from diffad.training.synthesis import ANOMALY_REGIONS
from diffad.training.trainer import _train_config_from_dict, holdout_split, load_training_images, run_validation_set

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


def rule_label(reference: bool, top_k: int) -> str:
    """A candidate of training/score_rule.py under this script's rule names."""
    return ("z " if reference else "") + ("max" if top_k == 1 else f"top-{top_k} mean")


def default_rule(run_dir: str, model) -> tuple[bool, int]:
    """The method's own rule: what training's choice keeps on a tie (its record, or for runs from before the
    choice, the model's rule as it was: DeCo-Diff's maximum, DiffusionAD's top-k mean)."""
    summary = Path(run_dir) / "train_summary.json"
    rule = (json.loads(summary.read_text()).get("validation") or {}).get("score_rule") if summary.is_file() else None
    if rule and "default" in rule:
        return rule["default"]["score_reference"], rule["default"]["top_k"]
    return (False, 1) if rule or getattr(model.config, "method", "") == "decodiff" else (False, model.config.top_k)


def candidate_choice(validation: dict[str, float], default: tuple[bool, int]) -> str:
    """The rule that training chooses among its candidates from these validation figures."""
    return rule_label(*best_rule({rule: validation[rule_label(*rule)] for rule in candidate_rules(default)}, default))


def table(paths: list[str]) -> None:
    """Per category: each run's default and chosen rule, validation / test, then mean and std over the runs."""
    by_category: dict[str, list[dict]] = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        by_category.setdefault(Path(result["data"]).name, []).append(result)
    print("| category | runs | own rule: validation / test image AUROC | chosen rules | chosen: validation / test "
          "| test gain |")
    print("|---|---|---|---|---|---|")
    for category, results in sorted(by_category.items()):
        gain = figures(results, "test", "candidate_choice") - figures(results, "test", "default_rule")
        cells = [f"{figures(results, 'validation', rule).mean():.3f} / "
                 f"{mean_std_cell(figures(results, 'test', rule))}"
                 for rule in ("default_rule", "candidate_choice")]
        rules = ", ".join(r["candidate_choice"] for r in results)
        gain_cell = mean_std_cell(gain, signed=True)
        print(f"| `{category}` | {len(results)} | {cells[0]} | {rules} | {cells[1]} | {gain_cell} |")


def figures(results: list[dict], split: str, rule_key: str) -> np.ndarray:
    """Each result's image AUROC on split ("validation" or "test") under the rule its rule_key names."""
    return np.array([r[f"{split}_image_auroc"][r[rule_key]] for r in results])


def parse_run_or_table(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """A bench script's arguments: RUN and DATA to measure one run, or --table RESULT... to summarise; --json."""
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if not args.table and not (args.run_dir and args.data_dir):
        parser.error("give RUN and DATA, or --table")
    return args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?")
    parser.add_argument("data_dir", nargs="?")
    parser.add_argument("--table", nargs="+", metavar="RESULT", help="summarise results of this script instead")
    parser.add_argument("--reference", type=int, default=64, metavar="N",
                        help="training images whose per-pixel map mean and std centre the map (default 64)")
    parser.add_argument("--anomaly-regions", choices=ANOMALY_REGIONS,
                        help="validate on anomalies of all regions or of one small region (default: the run's own)")
    args = parse_run_or_table(parser, argv)
    if args.table:
        return table(args.table)

    model = ckpt.load_model(args.run_dir)
    size, channels = model.config.image_size, model.config.in_channels
    saved = json.loads((Path(args.run_dir) / ckpt.CONFIG_FILE).read_text())
    synthesis = _train_config_from_dict(saved["train"]).synthesis
    if args.anomaly_regions:
        synthesis = dataclasses.replace(synthesis, regions=args.anomaly_regions)
    vset = run_validation_set(args.run_dir, args.data_dir, size, channels, synthesis)
    if vset is None:
        sys.exit(f"{args.run_dir} has no validation set to choose a rule on")
    test = read_test_set(args.data_dir, size, channels)
    reference_images = reference_maps(args.run_dir, args.data_dir, model, args.reference)
    reference = MapReference(1, size)
    reference.fit(0, torch.from_numpy(reference_images)[:, None])
    validation_maps, _ = predict(model, vset.images, desc="validation")
    test_maps, _ = predict(model, test.images, desc="test set")
    default = default_rule(args.run_dir, model)
    top_ks = (*TOP_K, model.config.top_k, default[1])  # the model's own rules among them
    validation = {k: image_auroc(vset.labels, v) for k, v in all_rules(validation_maps, reference, top_ks).items()}
    test_figures = {k: image_auroc(test.labels, v) for k, v in all_rules(test_maps, reference, top_ks).items()}
    for rule in validation:
        print(f"{rule:>26}: validation image AUROC {validation[rule]:.3f}   test {test_figures[rule]:.3f}")
    best = max(validation, key=validation.get)
    chosen = candidate_choice(validation, default)
    print(f"validation would choose: {best}; among training's candidates: {chosen} (test {test_figures[chosen]:.3f}, "
          f"the method's own {rule_label(*default)}: {test_figures[rule_label(*default)]:.3f})")
    emit({"command": shlex.join(["python", *sys.argv]), "run": str(args.run_dir), "data": str(args.data_dir),
          "validation_images": len(vset), "anomaly_regions": synthesis.regions,
          "test_images": len(test.labels), "reference_images": len(reference_images),
          "model_rule": rule_label(getattr(model.config, "score_reference", False), model.config.top_k),
          "default_rule": rule_label(*default), "candidate_choice": chosen,
          "validation_image_auroc": validation, "test_image_auroc": test_figures,
          "validation_choice": best, "machine": machine()}, args.json)


if __name__ == "__main__":
    main()

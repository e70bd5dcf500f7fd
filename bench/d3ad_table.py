"""One-step against D3AD (fixed level, level per image) on the same models, over seeds: the README's table.

Reads the records that `diffad bench speed RUN DATA --methods one-step,d3ad-fixed,d3ad --limit 0` writes
(the test set's metrics and time per image of each method) and, where present, the matching
`bench/d3ad_validation.py` records (<same name>_validation.json: the run's validation score of each
method), and prints one markdown row per category and method: each figure as mean ± sample std over the
seeds, and the gain of each D3AD mode over one-step, per seed and then averaged. Times per image and
slowdowns are the median over the seeds: a run that shared the cores with other work is slower in every
method, and the median leaves one such run out.

    python bench/d3ad_table.py bench/results/d3ad/*_600steps_seed*_speed.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from diffad.benchmarks.quality import mean_std_cell

METHODS = {"one-step": "one-step", "d3ad-fixed": "D3AD, fixed level", "d3ad": "D3AD, level per image"}
VALIDATION_ROWS = {"one-step": "one-step", "d3ad-fixed": "d3ad-fixed w4 T128", "d3ad": "d3ad w4 T128"}
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1_max")
NAME = re.compile(r"(?P<category>.+)_small_(?P<setting>.+)_seed(?P<seed>\d+)_speed\.json")


def load(paths: list[Path]) -> dict[str, list[dict]]:
    """Per category, one entry per seed: {method: {metric: value, "seconds": s, "validation": v}}."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(paths):
        match = NAME.fullmatch(path.name)
        if match is None:
            raise SystemExit(f"{path}: not a <category>_small_<setting>_seed<S>_speed.json record")
        record = json.loads(path.read_text())
        rows = {m["method"]: m for m in record["reconstruction"]["methods"]}
        validation_path = path.with_name(path.name.replace("_speed.json", "_validation.json"))
        validation = {}
        if validation_path.is_file():
            validation = {r["method"]: r["score"] for r in json.loads(validation_path.read_text())["rows"]
                          if r.get("map", "segmentation") == "segmentation"}
        run = {}
        for method in METHODS:
            row = rows[method]
            run[method] = {**{k: row[k] for k in METRICS}, "seconds": row["seconds_per_image"],
                           "slowdown": row["slowdown_vs_one_step"],
                           "validation": validation.get(VALIDATION_ROWS[method])}
        runs.setdefault(match["category"], []).append({"seed": int(match["seed"]), **run})
    return runs


def table(runs: dict[str, list[dict]]) -> str:
    lines = ["| category | method | seeds | s / image (median) | slowdown (median) | validation | image AUROC "
             "| pixel AUROC | AUPRO | pixel AP | image F1 | pixel AUROC gain | AUPRO gain |", "|" + "---|" * 13]
    for category, seeds in runs.items():
        for method, label in METHODS.items():
            seconds = statistics.median(s[method]["seconds"] for s in seeds)
            figures = [f"{seconds:.3f}", f"{statistics.median(s[method]['slowdown'] for s in seeds):.1f}x"]
            validations = [s[method]["validation"] for s in seeds if s[method]["validation"] is not None]
            figures.append(mean_std_cell(validations) if validations else "")
            figures += [mean_std_cell([s[method][k] for s in seeds]) for k in METRICS]
            for k in ("pixel_auroc", "pixel_aupro"):
                figures.append("" if method == "one-step" else
                               mean_std_cell([s[method][k] - s["one-step"][k] for s in seeds], signed=True))
            lines.append(f"| `{category}` | {label} | {','.join(str(s['seed']) for s in seeds)} | "
                         + " | ".join(figures) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", type=Path, help="`diffad bench speed` records, *_speed.json")
    print(table(load(parser.parse_args(argv).records)))


if __name__ == "__main__":
    main()

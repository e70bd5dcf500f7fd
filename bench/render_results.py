"""Collect a training run's measured figures into bench/results/ and render the README's results table.

    python bench/render_results.py collect runs/dagm_small --name dagm_class1_small
    python bench/render_results.py table          # rewrites the table in README.md

The table sits between the markers <!-- results:start --> and <!-- results:end --> in README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1_max")
START, END = "<!-- results:start -->", "<!-- results:end -->"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU" if cpu else f"{os.cpu_count()} cores"


def collect(run_dir: Path, name: str, note: str | None = None) -> Path:
    """Merge train_summary.json and eval.json of a run into bench/results/<name>.json."""
    summary = json.loads((run_dir / "train_summary.json").read_text())
    evaluation = json.loads((run_dir / "eval.json").read_text())
    result = {
        "name": name,
        "dataset": Path(evaluation["data_dir"]).name,
        "preset": summary["preset"],
        "metrics": {k: evaluation[k] for k in METRICS},
        "calibrated_threshold": evaluation.get("calibrated_threshold"),
        "test_images": evaluation["num_test_images"],
        "anomalous_test_images": evaluation["num_anomalous"],
        "eval_images_per_s": evaluation["inference_images_per_s"],
        "training": {k: summary[k] for k in ("steps", "train_seconds", "seconds_per_step", "num_train_images",
                                             "image_size", "in_channels", "pipeline_gmac_per_image")},
        "torch": summary["torch"],
        "machine": machine(),
    }
    if note:
        result["note"] = note
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def table() -> str:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    rows = [r for r in rows if "metrics" in r]  # quality results; speed results have their own files
    lines = ["| dataset | preset | image AUROC | pixel AUROC | AUPRO | pixel AP | image F1-max | training |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, t = r["metrics"], r["training"]
        lines.append(f"| `{r['dataset']}` | {r['preset']} | " + " | ".join(f"{m[k]:.3f}" for k in METRICS)
                     + f" | {t['steps']} steps, {t['train_seconds'] / 60:.1f} min |")
    machines = sorted({r["machine"] for r in rows})
    return "\n".join(lines) + ("\n\nMachine: " + "; ".join(machines) if machines else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("collect")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--note", help="conditions worth knowing, kept with the figures")
    verbs.add_parser("table")
    args = parser.parse_args()
    if args.verb == "collect":
        print(collect(args.run_dir, args.name, args.note))
    else:
        readme = ROOT / "README.md"
        text = readme.read_text()
        pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no {START} ... {END} markers")
        readme.write_text(pattern.sub(f"{START}\n{table()}\n{END}", text))
        print(table())


if __name__ == "__main__":
    main()

"""`diffad bench quality`: train, evaluate and record each category, one JSON per category.

For every DATASET (an MVTec-layout category): train a model with the given preset and time budget into
RUNS_DIR/<dataset>_<preset> (the same training as `diffad train`), evaluate it on the category's test set
(the same evaluation as `diffad evaluate`, which also calibrates the threshold), and write
OUT_DIR/<dataset>_<preset>.json in the format `bench/render_results.py collect` writes, so
`python bench/render_results.py table` puts it in the README's results table. The command prints one JSON
object (every category's record and the Markdown table) on stdout; progress goes to stderr.

    diffad bench quality ../shared/datasets/dagm_class1 ../shared/datasets/magnetic_tile --max-minutes 30
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("diffad.bench.quality")

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1_max")
TRAINING_FIELDS = ("steps", "train_seconds", "seconds_per_step", "num_train_images", "image_size", "in_channels",
                   "pipeline_gmac_per_image")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("datasets", nargs="+", metavar="DATASET", help="MVTec-layout categories")
    p.add_argument("--preset", choices=("tiny", "small", "paper"), default="small", help="default small")
    p.add_argument("--image-size", type=int,
                   help="square input size (default: the preset's); the record's name then ends in _<size>px")
    p.add_argument("--max-minutes", type=float, default=30.0,
                   help="training budget per category, wall-clock minutes (default 30)")
    p.add_argument("--max-steps", type=int, help="also stop training after this many steps")
    p.add_argument("--out-dir", default="bench/results", help="where the JSON records go (default bench/results)")
    p.add_argument("--runs-dir", default="runs/bench", help="where the training runs go (default runs/bench)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size (default 8)")
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="learning-rate schedule over the budget, as in diffad train (default cosine)")
    p.add_argument("--anomaly-sources", metavar="LIST",
                   help="synthetic anomaly sources, as in diffad train (default self,procedural)")
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the networks train")
    p.add_argument("--note", help="conditions worth knowing, kept with the figures")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run folder (default: refuse, so no run is lost by accident)")
    p.add_argument("--json", metavar="FILE", help="also write the printed JSON object to FILE")


def command_line(args) -> str:
    """The command as typed (set by the cli), else rebuilt from the parsed arguments."""
    if getattr(args, "command", None):
        return args.command
    words = ["diffad", "bench", "quality", *args.datasets, "--preset", args.preset]
    if args.image_size is not None:
        words += ["--image-size", str(args.image_size)]
    words += ["--max-minutes", f"{args.max_minutes:g}"]
    if args.max_steps is not None:
        words += ["--max-steps", str(args.max_steps)]
    words += ["--out-dir", str(args.out_dir), "--runs-dir", str(args.runs_dir), "--seed", str(args.seed),
              "--batch-size", str(args.batch_size), "--lr-schedule", args.lr_schedule]
    if args.anomaly_sources is not None:
        words += ["--anomaly-sources", args.anomaly_sources]
    words += ["--workers", str(args.workers)]
    if args.device != "cpu":
        words += ["--device", args.device]
    return shlex.join(words)


def machine_summary(details: dict | None = None) -> str:
    """One line for the results table, from throughput.machine(): CPU model, core count, GPU."""
    from .throughput import machine

    details = details or machine()
    cpu = details.get("cpu") or details["processor"]
    return f"{cpu}, {details.get('cpu_count')} cores, {details.get('gpu', 'no GPU')}"


def quality_record(name: str, summary: dict, evaluation: dict, note: str | None = None,
                   extra: dict | None = None) -> dict:
    """A results file's content from a run's train_summary.json and eval.json (bench/results/*_small.json)."""
    import torch

    record = {
        "name": name,
        "dataset": Path(evaluation["data_dir"]).name,
        "preset": summary["preset"],
        "metrics": {k: evaluation[k] for k in METRICS},
        "calibrated_threshold": evaluation.get("calibrated_threshold"),
        "test_images": evaluation["num_test_images"],
        "anomalous_test_images": evaluation["num_anomalous"],
        "eval_images_per_s": evaluation["inference_images_per_s"],
        "training": {k: summary[k] for k in TRAINING_FIELDS},
        "torch": summary.get("torch", torch.__version__),
        "machine": machine_summary((extra or {}).get("machine_details")),
    }
    if note:
        record["note"] = note
    record.update(extra or {})
    return record


def markdown_table(records: list[dict]) -> str:
    """The README's results table for quality records (files with "metrics"); other records are skipped."""
    records = [r for r in records if "metrics" in r]
    lines = ["| dataset | preset, input | image AUROC | pixel AUROC | AUPRO | pixel AP | image F1-max | training |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        m, t = r["metrics"], r["training"]
        lines.append(f"| `{r['dataset']}` | {r['preset']}, {t['image_size']} px | "
                     + " | ".join(f"{m[k]:.3f}" for k in METRICS)
                     + f" | {t['steps']} steps, {t['train_seconds'] / 60:.1f} min |")
    machines = sorted({r["machine"] for r in records})
    return "\n".join(lines) + ("\n\nMachine: " + "; ".join(machines) if machines else "")


def run(args) -> int:
    import dataclasses

    from ..models.data import find_test_samples
    from ..models.evaluation import evaluate_run
    from ..models.synthesis import SynthesisConfig, parse_sources
    from ..models.training import LEARNING_RATES, TrainConfig, train, training_device
    from .throughput import machine

    if (args.max_minutes <= 0 or (args.max_steps is not None and args.max_steps < 1) or args.batch_size < 1
            or (args.image_size is not None and args.image_size < 1)):
        raise ValueError("--max-minutes, --max-steps, --batch-size and --image-size must be positive")
    variant = f"{args.preset}_{args.image_size}px" if args.image_size else args.preset
    device = training_device(args.device)
    out_dir, runs_dir = Path(args.out_dir), Path(args.runs_dir)
    datasets = [Path(d) for d in args.datasets]
    names = [d.resolve().name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"two datasets share a folder name ({', '.join(names)}): their records would collide")
    plans = []
    for dataset, name in zip(datasets, names, strict=True):  # every problem reported before hours of training
        find_test_samples(dataset)  # an MVTec-layout category with a labelled test set (DataError otherwise)
        run_dir = runs_dir / f"{name}_{variant}"
        if run_dir.exists() and any(run_dir.iterdir()) and not args.overwrite:
            raise ValueError(f"{run_dir} already exists; pass --overwrite to train it again from scratch")
        plans.append((dataset, name, run_dir))

    command = command_line(args)
    details = machine()
    unet_lr, seg_lr = LEARNING_RATES[args.preset]
    cfg = TrainConfig(batch_size=args.batch_size, unet_lr=unet_lr, segmentation_lr=seg_lr, max_steps=args.max_steps,
                      max_minutes=args.max_minutes, seed=args.seed, workers=args.workers,
                      lr_schedule=args.lr_schedule, device=device,
                      synthesis=SynthesisConfig(sources=parse_sources(args.anomaly_sources)))
    records, files = [], []
    for dataset, name, run_dir in plans:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        log.info("%s: training the %s preset for at most %g min%s into %s", name, args.preset, args.max_minutes,
                 f" / {args.max_steps} steps" if args.max_steps else "", run_dir)
        summary = train(dataset, run_dir, args.preset, image_size=args.image_size,
                        train_config=dataclasses.replace(cfg))
        log.info("%s: evaluating on %s", name, dataset / "test")
        evaluation = evaluate_run(run_dir, dataset, run_dir / "eval.json", args.batch_size)
        record = quality_record(f"{name}_{variant}", summary, evaluation, args.note, extra={
            "run_dir": str(run_dir),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command,
            "machine_details": details,
            "onnxruntime": details.get("onnxruntime"),
            "budget": {"max_minutes": args.max_minutes, "max_steps": args.max_steps,
                       "batch_size": args.batch_size, "lr_schedule": args.lr_schedule,
                       "device": device},
            "anomaly_sources": list(cfg.synthesis.sources),
        })
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{record['name']}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        log.info("%s: %s; written to %s", name,
                 ", ".join(f"{k} {record['metrics'][k]:.3f}" for k in METRICS), path)
        records.append(record)
        files.append(str(path))

    table = markdown_table(records)
    out = {"benchmark": "quality", "command": command, "files": files, "results": records, "table": table}
    text = json.dumps(out, indent=2)
    print(table, file=sys.stderr)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0

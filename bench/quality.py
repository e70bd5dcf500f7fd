"""`diffad bench quality`: train, evaluate and record each category and seed, one JSON per run.

For every DATASET (an MVTec-layout category) and every seed of --seeds: train a model with the given preset
and time budget into RUNS_DIR/<dataset>_<variant>_seed<S> (the same training as `diffad train`), evaluate it
on the category's test set (the same evaluation as `diffad evaluate`, which also calibrates the threshold),
and write OUT_DIR/<dataset>_<variant>_seed<S>.json in the format `bench/render_results.py collect` writes,
so `python bench/render_results.py table` puts it in the README's results table. <variant> is the preset,
then _<size>px with --image-size, then _<NAME> with --setting NAME; <dataset>_<variant> is the record's
"group": the runs of one setting, which the table and the printed "summary" aggregate over the seeds.

The result file marks a finished run (it is written atomically, last): a (dataset, seed) whose result file
exists is skipped and its record reused, so an interrupted benchmark resumes where it stopped; a run
folder without a result file is an interrupted run and is trained again from scratch; --overwrite trains
every run again. The command prints one JSON object (every record, the per-group summary and the Markdown
table) on stdout; progress goes to stderr.

    diffad bench quality ../shared/datasets/dagm_class1 ../shared/datasets/magnetic_tile --max-minutes 30 \
        --seeds 0,1,2

With --method decodiff --multi-class, each seed trains ONE model on the union of every DATASET's good images
(the category as its condition; one input size, and 3 channels if any category is in colour) into
RUNS_DIR/decodiff_multiclass_<preset>_<datasets>_seed<S>, evaluates it on each category's test set, and
writes one record per category, <dataset>_decodiff_multiclass_<preset>_seed<S>.json. The budget is the one
model's: for the same total time as per-category runs, give it their budget times the number of categories.
A seed whose records all exist is skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("diffad.bench.quality")

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1_max")
TRAINING_FIELDS = ("steps", "train_seconds", "seconds_per_step", "num_train_images", "image_size", "in_channels",
                   "pipeline_gmac_per_image", "chosen_step", "precision", "precision_reason", "memory_format",
                   "t_s", "map_sigma", "score", "crop", "crops_per_image", "validation")


SETTING = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")  # a setting label goes into file names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("datasets", nargs="+", metavar="DATASET", help="MVTec-layout categories")
    p.add_argument("--preset", choices=("tiny", "small", "paper"), default="small", help="default small")
    p.add_argument("--method", choices=("diffusionad", "decodiff"), default="diffusionad",
                   help="diffusionad (default), or decodiff: one DeCo-Diff model per category, on the same budget "
                   "(records named <dataset>_decodiff_<preset>..., a row of their own in the table)")
    p.add_argument("--multi-class", action="store_true",
                   help="with --method decodiff: one model per seed for all DATASETs together (the budget is the "
                   "one model's), evaluated on each; records <dataset>_decodiff_multiclass_<preset>...")
    p.add_argument("--image-size", type=int,
                   help="square input size (default: the preset's); the record's name then has _<size>px")
    p.add_argument("--setting", metavar="NAME",
                   help="a short label for an ablation (e.g. crop64: letters, digits, '.', '-'), added to the "
                        "record's name and group and shown in the results table")
    p.add_argument("--max-minutes", type=float, default=30.0,
                   help="training budget per run, wall-clock minutes (default 30)")
    p.add_argument("--max-steps", type=int, help="also stop training after this many steps")
    p.add_argument("--out-dir", default="bench/results", help="where the JSON records go (default bench/results)")
    p.add_argument("--runs-dir", default="runs/bench", help="where the training runs go (default runs/bench)")
    p.add_argument("--seeds", metavar="LIST",
                   help="comma-separated training seeds, one run and one record each (default 0)")
    p.add_argument("--seed", type=int, help="a single seed: the same as --seeds S")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size (default 8)")
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="learning-rate schedule over the budget, as in diffad train (default cosine)")
    p.add_argument("--anomaly-sources", metavar="LIST",
                   help="synthetic anomaly sources, as in diffad train (default: its default)")
    p.add_argument("--perlin-scales", metavar="MIN,MAX",
                   help="synthetic anomaly regions' Perlin scales, as in diffad train (default: its default)")
    p.add_argument("--anomaly-regions", choices=("all", "one"), default="all",
                   help="synthetic anomaly regions: all or one connected region, as in diffad train (default all)")
    p.add_argument("--map-sigma", type=float, metavar="SIGMA",
                   help="fix the map's smoothing, as in diffad train (default: chosen on the validation set)")
    p.add_argument("--crop", type=int,
                   help="train on random crops of this size, as in diffad train (default: the preset's on a "
                   "texture, whole images on a part against a plain background; 0: none)")
    p.add_argument("--crops-per-image", type=int, help="crops per image and step (default: the preset's)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="as in diffad train: auto (default) uses bf16 only where it is native")
    p.add_argument("--ema-decay", type=float, default=0.995, help="as in diffad train (default 0.995; 0: off)")
    p.add_argument("--focal-gamma", type=float, help="as in diffad train (default: TrainConfig's)")
    p.add_argument("--segmentation-input", choices=("pair", "difference"), default="pair",
                   help="as in diffad train (default pair)")
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes (default 1)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda[:N]: where the networks train and are evaluated (in fp32)")
    p.add_argument("--d3ad", action="store_true",
                   help="also evaluate each trained model in D3AD's two modes (a fixed and a per-image noise level, "
                   "no retraining; the bins and threshold from its held-out good images): the record's `d3ad`")
    p.add_argument("--note", help="conditions worth knowing, kept with the figures")
    p.add_argument("--overwrite", action="store_true",
                   help="train every run again, replacing its result file (default: a run whose result file "
                        "exists is skipped and its record reused)")
    p.add_argument("--json", metavar="FILE", help="also write the printed JSON object to FILE")


def parse_seeds(args) -> list[int]:
    """The seeds of --seeds LIST or --seed S (default [0]); ValueError for a malformed or repeated seed."""
    if args.seeds is not None and args.seed is not None:
        raise ValueError("give --seeds or --seed, not both")
    if args.seed is not None:
        text = str(args.seed)
    else:
        text = "0" if args.seeds is None else args.seeds
    try:
        seeds = [int(word) for word in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds wants comma-separated whole numbers, not {text!r}") from None
    if any(seed < 0 for seed in seeds):
        raise ValueError(f"seeds cannot be negative ({text})")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed is repeated in {text!r}: its runs would collide")
    return seeds


def command_line(args) -> str:
    """The command as typed (set by the cli), else rebuilt from the parsed arguments."""
    if getattr(args, "command", None):
        return args.command
    words = ["diffad", "bench", "quality", *args.datasets, "--preset", args.preset]
    if getattr(args, "method", "diffusionad") != "diffusionad":
        words += ["--method", args.method]
    if getattr(args, "multi_class", False):
        words += ["--multi-class"]
    if args.image_size is not None:
        words += ["--image-size", str(args.image_size)]
    if getattr(args, "setting", None):
        words += ["--setting", args.setting]
    words += ["--max-minutes", f"{args.max_minutes:g}"]
    if args.max_steps is not None:
        words += ["--max-steps", str(args.max_steps)]
    words += ["--out-dir", str(args.out_dir), "--runs-dir", str(args.runs_dir),
              "--seeds", ",".join(map(str, parse_seeds(args))),
              "--batch-size", str(args.batch_size), "--lr-schedule", args.lr_schedule]
    if args.anomaly_sources is not None:
        words += ["--anomaly-sources", args.anomaly_sources]
    if getattr(args, "perlin_scales", None) is not None:
        words += ["--perlin-scales", args.perlin_scales]
    if getattr(args, "anomaly_regions", "all") != "all":
        words += ["--anomaly-regions", args.anomaly_regions]
    if getattr(args, "map_sigma", None) is not None:
        words += ["--map-sigma", f"{args.map_sigma:g}"]
    if args.crop is not None:
        words += ["--crop", str(args.crop)]
    if args.crops_per_image is not None:
        words += ["--crops-per-image", str(args.crops_per_image)]
    if args.precision != "auto":
        words += ["--precision", args.precision]
    if args.ema_decay != 0.995:
        words += ["--ema-decay", f"{args.ema_decay:g}"]
    if args.focal_gamma is not None:
        words += ["--focal-gamma", f"{args.focal_gamma:g}"]
    if getattr(args, "segmentation_input", "pair") != "pair":
        words += ["--segmentation-input", args.segmentation_input]
    words += ["--workers", str(args.workers)]
    if args.device != "cpu":
        words += ["--device", args.device]
    return shlex.join(words)


def machine_summary(details: dict | None = None) -> str:
    """One line for the results table, from throughput.machine(): CPU model, core count, GPU."""
    from .throughput import machine

    details = details or machine()
    cpu = details.get("cpu") or details["processor"]
    bf16 = {True: ", native bf16", False: ", no native bf16"}.get(details.get("native_bf16_cpu"), "")
    return f"{cpu}, {details.get('cpu_count')} cores{bf16}, {details.get('gpu', 'no GPU')}"


def quality_record(name: str, summary: dict, evaluation: dict, note: str | None = None,
                   extra: dict | None = None) -> dict:
    """A results file's content from a run's train_summary.json and eval.json (bench/results/*_small.json)."""
    import torch

    record = {
        "name": name,
        "dataset": Path(evaluation["data_dir"]).name,
        "preset": summary["preset"],
        "metrics": {k: evaluation[k] for k in METRICS},
        **({"per_defect_type": evaluation["per_defect_type"]} if "per_defect_type" in evaluation else {}),
        "calibrated_threshold": evaluation.get("calibrated_threshold"),
        "test_images": evaluation["num_test_images"],
        "anomalous_test_images": evaluation["num_anomalous"],
        "eval_images_per_s": evaluation["inference_images_per_s"],
        "training": {k: summary[k] for k in TRAINING_FIELDS if k in summary},
        "torch": summary.get("torch", torch.__version__),
        "machine": machine_summary((extra or {}).get("machine_details")),
    }
    if note:
        record["note"] = note
    record.update(extra or {})
    return record


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (ddof=1, statistics.stdev) of values; std None for one value."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) >= 2 else None)


def _table_key(record: dict) -> tuple:
    """Records of one group share a table row: same dataset, preset, input size and setting. Records older
    than seeds (no "group") are each their own row."""
    if "group" not in record:
        return ("record", record["name"])
    return ("group", record["dataset"], record.get("method", "diffusionad"), record["preset"],
            record["training"]["image_size"], record.get("setting"), tuple(record.get("multi_class") or ()))


def _groups(records: list[dict], key) -> dict:
    groups: dict = {}
    for r in records:
        groups.setdefault(key(r), []).append(r)
    return {k: sorted(rs, key=lambda r: r.get("seed", 0)) for k, rs in groups.items()}


def summarize(records: list[dict]) -> dict:
    """Per group ("group", else the record's own name): n, seeds, and for each of METRICS the mean, the
    sample standard deviation (ddof=1; None when n is 1) and the per-seed values, in seed order; also the
    mean training steps and minutes."""
    out = {}
    for group, rs in _groups([r for r in records if "metrics" in r], lambda r: r.get("group", r["name"])).items():
        metrics = {}
        for k in METRICS:
            values = [r["metrics"][k] for r in rs]
            mean, std = mean_std(values)
            metrics[k] = {"mean": mean, "std": std, "values": values}
        out[group] = {
            "n": len(rs),
            "seeds": [r.get("seed") for r in rs],
            "names": [r["name"] for r in rs],
            "metrics": metrics,
            "training": {"mean_steps": statistics.fmean(r["training"]["steps"] for r in rs),
                         "mean_minutes": statistics.fmean(r["training"]["train_seconds"] / 60 for r in rs)},
        }
    return out


def mean_std_cell(values, signed: bool = False) -> str:
    """values as a table cell: "mean ± sample std" to 3 decimals (the mean alone for one value); signed
    writes the mean's sign, for gains."""
    mean, std = mean_std(values)
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text if std is None else f"{text} ± {std:.3f}"


def row_label(record: dict) -> str:
    """A table row's "preset, input" cell: "small, 128 px", then the setting, the method if not DiffusionAD,
    and "one model for N categories" for a multi-class record."""
    label = f"{record['preset']}, {record['training']['image_size']} px"
    if record.get("setting"):
        label += f", {record['setting']}"
    if record.get("method", "diffusionad") != "diffusionad":
        label += f", {record['method']}"
    if record.get("multi_class"):
        label += f", one model for {len(record['multi_class'])} categories"
    return label


def markdown_table(records: list[dict], validation: bool = False) -> str:
    """The README's results table for quality records (files with "metrics"); other records are skipped.

    One row per group (same dataset, preset, input size and setting): each metric as "mean ± std" over the
    group's seeds (sample standard deviation, ddof=1), a plain value for a group of one record; `seeds` is the
    number of records; training gives the (mean) steps and minutes. A record without "group" (written before
    seeds) is a row of its own. With `validation`, a column for the score of the checkpoint training kept on
    its validation set (held-out good images with fixed synthetic anomalies): what settings are chosen by."""
    records = [r for r in records if "metrics" in r]
    lines = ["| dataset | preset, input | seeds |" + (" validation |" if validation else "")
             + " image AUROC | pixel AUROC | AUPRO | pixel AP | image F1-max | training |",
             "|---|---|---|" + ("---|" if validation else "") + "---|---|---|---|---|---|"]
    for rs in _groups(records, _table_key).values():
        r, n = rs[0], len(rs)
        preset = row_label(r)
        steps = statistics.fmean(x["training"]["steps"] for x in rs)
        minutes = statistics.fmean(x["training"]["train_seconds"] / 60 for x in rs)
        training = f"{steps:.0f} steps, {minutes:.1f} min" + (" (mean)" if n > 1 else "")
        chosen = [x["training"].get("validation", {}).get("chosen", {}).get("score") for x in rs]
        kept = mean_std_cell(chosen) if None not in chosen else ""
        lines.append(f"| `{r['dataset']}` | {preset} | {n} | " + (f"{kept} | " if validation else "")
                     + " | ".join(mean_std_cell([x["metrics"][k] for x in rs]) for k in METRICS)
                     + f" | {training} |")
    machines = sorted({r["machine"] for r in records})
    return "\n".join(lines) + ("\n\nMachine: " + "; ".join(machines) if machines else "")


def defect_type_table(records: list[dict]) -> str:
    """Per defect type, the figures of each group's records that have them ("per_defect_type"): image AUROC,
    pixel AUROC and pixel AP of that type against the good test images, mean ± std over the seeds, and the
    type's share of its images' pixels (large defects decide a category's pixel AUROC). "" when none has."""
    records = [r for r in records if "per_defect_type" in r]
    if not records:
        return ""
    lines = ["| dataset | preset, input | seeds | defect type | images | defect area | image AUROC | pixel AUROC "
             "| pixel AP |", "|---|---|---|---|---|---|---|---|---|"]
    for rs in _groups(records, _table_key).values():
        r = rs[0]
        preset = row_label(r)
        for name, first in r["per_defect_type"].items():
            entries = [x["per_defect_type"][name] for x in rs if name in x["per_defect_type"]]
            cells = [mean_std_cell([e[k] for e in entries]) if all(k in e for e in entries) else "–"
                     for k in ("image_auroc", "pixel_auroc", "pixel_ap")]
            area = f"{100 * first['defect_area']:.2f} %" if "defect_area" in first else "–"
            lines.append(f"| `{r['dataset']}` | {preset} | {len(entries)} | {name} | {first['images']} | {area} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_atomically(path: Path, text: str) -> None:
    """Write text to path through a temporary file in the same folder and a rename, so that an interrupted
    write leaves the old file or none, never half a file (the temporary's name does not end in .json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_result(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable result ({e}); pass --overwrite to train it again") from None
    if not isinstance(record, dict) or "metrics" not in record:
        raise ValueError(f"{path} is not a bench quality result; pass --overwrite to train it again")
    return record


def run(args) -> int:
    import dataclasses

    from ..evaluation.d3ad import evaluate_d3ad_modes
    from ..evaluation.evaluate import evaluate_run
    from ..training import trainer
    from ..training.data import find_test_samples
    from ..training.synthesis import SynthesisConfig, parse_perlin_scales, parse_sources
    from .throughput import emit, machine

    if (args.max_minutes <= 0 or (args.max_steps is not None and args.max_steps < 1) or args.batch_size < 1
            or (args.image_size is not None and args.image_size < 1)):
        raise ValueError("--max-minutes, --max-steps, --batch-size and --image-size must be positive")
    setting = getattr(args, "setting", None)
    if setting is not None and not SETTING.fullmatch(setting):
        raise ValueError(f"--setting {setting!r}: a short label of letters, digits, '.' and '-' (it names files)")
    seeds = parse_seeds(args)
    method = getattr(args, "method", "diffusionad")
    multi_class = getattr(args, "multi_class", False)
    if method == "decodiff" and args.d3ad:
        raise ValueError("--d3ad evaluates DiffusionAD's reconstruction modes; leave it out with --method decodiff")
    segmentation_input = getattr(args, "segmentation_input", "pair")
    if method == "decodiff" and segmentation_input != "pair":
        raise ValueError("--segmentation-input is DiffusionAD's: DeCo-Diff has no segmentation network")
    map_sigma = getattr(args, "map_sigma", None)
    if method == "decodiff" and map_sigma is not None:
        raise ValueError("--map-sigma is DiffusionAD's: DeCo-Diff's map keeps the paper's blur")
    if map_sigma is not None and not 0 <= map_sigma < float("inf"):
        raise ValueError(f"--map-sigma must be 0 (no smoothing) or a positive number of pixels, got {map_sigma}")
    if multi_class and (method != "decodiff" or len(args.datasets) < 2):
        raise ValueError("--multi-class trains one DeCo-Diff model for several categories: it needs --method "
                         "decodiff and at least two DATASETs")
    variant = f"{args.preset}_{args.image_size}px" if args.image_size else args.preset
    if method != "diffusionad":
        variant = f"{method}_{'multiclass_' if multi_class else ''}{variant}"
    if setting:
        variant += f"_{setting}"
    device = trainer.training_device(args.device)
    out_dir, runs_dir = Path(args.out_dir), Path(args.runs_dir)
    datasets = [Path(d) for d in args.datasets]
    names = [d.resolve().name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"two datasets share a folder name ({', '.join(names)}): their records would collide")
    for dataset in datasets:  # every problem reported before hours of training
        find_test_samples(dataset)  # an MVTec-layout category with a labelled test set (DataError otherwise)

    def member(dataset: Path, name: str, seed: int) -> tuple:
        """One category of a run: (dataset, name, group, its result file, its existing record or None)."""
        result = out_dir / f"{name}_{variant}_seed{seed}.json"
        existing = None if args.overwrite or not result.exists() else _read_result(result)
        return dataset, name, f"{name}_{variant}", result, existing

    # A job is one training run: one category's, or with --multi-class every category's at once.
    jobs = []
    for seed in seeds:
        if multi_class:
            jobs.append((seed, runs_dir / f"{variant}_{'+'.join(names)}_seed{seed}",
                         [member(d, n, seed) for d, n in zip(datasets, names, strict=True)]))
        else:
            jobs += [(seed, runs_dir / f"{n}_{variant}_seed{seed}", [member(d, n, seed)])
                     for d, n in zip(datasets, names, strict=True)]
    jobs.sort(key=lambda job: [m[1] for m in job[2]])  # category by category, seeds in order

    command = command_line(args)
    details = machine()
    unet_lr, seg_lr = trainer.LEARNING_RATES[args.preset]
    crop, crops_per_image, whole_images_for_objects = trainer.crop_setting(args.preset, args.crop,
                                                                            args.crops_per_image)
    whole_images_for_objects = whole_images_for_objects and method == "diffusionad"  # DeCo-Diff: crops as asked
    cfg = trainer.TrainConfig(batch_size=args.batch_size, unet_lr=unet_lr, segmentation_lr=seg_lr,
                               max_steps=args.max_steps, max_minutes=args.max_minutes, seed=seeds[0],
                               workers=args.workers, lr_schedule=args.lr_schedule, device=device,
                               crop=crop, crops_per_image=crops_per_image,
                               whole_images_for_objects=whole_images_for_objects, precision=args.precision,
                               ema_decay=args.ema_decay, segmentation_input=segmentation_input,
                               map_sigma_candidates=None if map_sigma is None else (map_sigma,),
                               **({"focal_gamma": args.focal_gamma} if args.focal_gamma is not None else {}),
                               synthesis=SynthesisConfig(sources=parse_sources(args.anomaly_sources),
                                                         regions=args.anomaly_regions,
                                                         **parse_perlin_scales(args.perlin_scales)))
    budget = {"max_minutes": args.max_minutes, "max_steps": args.max_steps, "batch_size": args.batch_size,
              "lr_schedule": args.lr_schedule, "device": device, "crop": crop,
              "crops_per_image": crops_per_image, "ema_decay": args.ema_decay,
              "focal_gamma": cfg.focal_gamma,
              # only where it departs from the paper's, so records from before the option still match
              **({"segmentation_input": cfg.segmentation_input} if cfg.segmentation_input != "pair" else {}),
              **({"map_sigma": map_sigma} if map_sigma is not None else {}),
              # the crop above gives way to whole images on a part (the run's "training" says which it took)
              **({"whole_images_for_objects": True} if whole_images_for_objects else {})}
    records, files, skipped = [], [], []
    for seed, run_dir, members in jobs:
        label = "+".join(m[1] for m in members)
        if all(existing is not None for *_, existing in members):
            for _, name, _, result, existing in members:
                log.info("%s seed %d: skipping, result exists: %s", name, seed, result)
                if existing.get("budget") != budget:
                    log.warning("%s seed %d: %s was made with another budget (%s); pass --overwrite to train it "
                                "again with this one", name, seed, result, existing.get("budget"))
                records.append(existing)
                files.append(str(result))
                skipped.append(str(result))
            continue
        for _, name, _, result, _ in members:
            if result.exists():  # --overwrite, or a multi-class run short of a category: the old result goes first
                log.info("%s seed %d: removing %s and training the run again", name, seed, result)
                result.unlink()
        if run_dir.exists():
            log.info("%s seed %d: %s has no result file (an interrupted run): removing it, training it again "
                     "from scratch", label, seed, run_dir)
            shutil.rmtree(run_dir)
        log.info("%s seed %d: training the %s preset for at most %g min%s into %s", label, seed, args.preset,
                 args.max_minutes, f" / {args.max_steps} steps" if args.max_steps else "", run_dir)
        train_config = dataclasses.replace(cfg, seed=seed)
        if method == "decodiff":
            from ..training.decodiff import train_decodiff

            summary = train_decodiff([m[0] for m in members], run_dir, args.preset, args.image_size,
                                     train_config=train_config)
        else:
            summary = trainer.train(members[0][0], run_dir, args.preset, image_size=args.image_size,
                                    train_config=train_config)
        finished = []
        for dataset, name, group, result, _ in members:
            log.info("%s seed %d: evaluating on %s", name, seed, dataset / "test")
            evaluation = evaluate_run(run_dir, dataset, run_dir / (f"eval.{name}.json" if multi_class else
                                                                   "eval.json"), args.batch_size, device=device)
            extra = {
                "group": group,
                "method": method,
                **({"multi_class": names} if multi_class else {}),
                "seed": seed,
                **({"setting": setting} if setting else {}),
                "run_dir": str(run_dir),
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": command,
                "machine_details": details,
                "onnxruntime": details.get("onnxruntime"),
                "budget": budget,
                "anomaly_sources": list(cfg.synthesis.sources),
                "perlin_scales_log2": [cfg.synthesis.min_scale_log2, cfg.synthesis.max_scale_log2],
                "anomaly_regions": cfg.synthesis.regions,
            }
            if args.d3ad:
                log.info("%s seed %d: evaluating D3AD's modes on the same model", name, seed)
                extra["d3ad"] = evaluate_d3ad_modes(run_dir, dataset, args.batch_size, device=device)
            finished.append((name, result, quality_record(f"{group}_seed{seed}", summary, evaluation, args.note,
                                                          extra=extra)))
        for name, result, record in finished:  # last: the run is finished
            write_atomically(result, json.dumps(record, indent=2) + "\n")
            log.info("%s seed %d: %s; written to %s", name, seed,
                     ", ".join(f"{k} {record['metrics'][k]:.3f}" for k in METRICS), result)
            records.append(record)
            files.append(str(result))

    table = markdown_table(records)
    out = {"benchmark": "quality", "command": command, "files": files, "skipped": skipped, "results": records,
           "summary": summarize(records), "table": table}
    print(table, file=sys.stderr)
    emit(out, args.json)
    return 0

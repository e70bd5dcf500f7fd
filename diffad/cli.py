"""The `diffad` command line: train, evaluate and describe DiffusionAD models.

Heavy imports (torch) happen inside each verb, so `diffad --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

EPILOG = """\
examples:
  diffad presets
  diffad train ../shared/datasets/dagm_class1 --out runs/dagm --preset small --max-minutes 30
  diffad evaluate runs/dagm ../shared/datasets/dagm_class1 --json runs/dagm/eval.json

DATA_DIR is an MVTec AD category (train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png,
optionally validation/good) or, for training, a plain folder of good images.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffad", description="DiffusionAD visual anomaly detection: train on good images, find defects.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("train", help="train a model on a folder of good images",
                         description="Train the reconstruction UNet and the segmentation network jointly on "
                         "good images, with synthetic anomalies made on the fly (offline: self-augmentation "
                         "and procedural textures). Writes config.json, checkpoints/, model.safetensors, "
                         "train_log.jsonl and train_summary.json into RUN_DIR.")
    p.add_argument("data_dir", metavar="DATA_DIR", help="MVTec-layout category or plain folder of good images")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for checkpoints and the model")
    p.add_argument("--preset", choices=("tiny", "small", "paper"), default="small",
                   help="model size: tiny (tests, seconds), small (2-core CPU, 30 min), paper (published size); "
                   "default small")
    p.add_argument("--image-size", type=_positive_int, help="square input size (default: the preset's)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 or 3 (default: detected from the images)")
    p.add_argument("--max-steps", type=_positive_int, help="stop after this many optimiser steps (in total)")
    p.add_argument("--max-minutes", type=_positive_float, help="stop after this much wall-clock time (this run)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="default 8")
    p.add_argument("--unet-lr", type=_positive_float, help="UNet learning rate (default: by preset)")
    p.add_argument("--seg-lr", type=_positive_float, help="segmentation learning rate (default: by preset)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, anomalies, noise (default 0)")
    p.add_argument("--foreground", choices=("auto", "none"), default="auto",
                   help="where anomalies may be painted: auto (estimated object, whole image for textures) "
                   "or none (whole image)")
    p.add_argument("--texture-dir", help="optional folder of texture images as an extra anomaly source")
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes (default 1)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=250, help="steps between checkpoints")
    p.add_argument("--no-bf16", action="store_true", help="train in float32 (bf16 autocast is the default)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in RUN_DIR")

    p = verbs.add_parser("evaluate", help="measure a model on a labelled test set and calibrate its threshold",
                         description="Image AUROC, pixel AUROC, AUPRO (up to 30%% FPR), pixel AP and image "
                         "F1-max on DATA_DIR/test. Stores the calibrated threshold in RUN_DIR/calibration.json: "
                         "a quantile of scores on validation/good when present, else the F1-optimal one.")
    p.add_argument("model", metavar="RUN_DIR_OR_BUNDLE", help="a training run folder or a model file")
    p.add_argument("data_dir", metavar="DATA_DIR", help="MVTec-layout category with test/ and ground_truth/")
    p.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--calibration", choices=("auto", "f1", "quantile", "none"), default="auto")
    p.add_argument("--quantile", type=float, default=0.99, help="for quantile calibration (default 0.99)")

    verbs.add_parser("presets", help="print each preset's parameter count and GMAC per image",
                     description="Parameters and multiply-accumulates per image of the one-step pipeline "
                     "(two UNet passes + segmentation) for each preset, at its default size, 3 channels.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from .models.checkpoint import CheckpointError
    from .models.data import DataError

    try:
        if args.verb == "train":
            return _train(args)
        if args.verb == "evaluate":
            return _evaluate(args)
        if args.verb == "presets":
            return _presets()
    except (DataError, CheckpointError, ValueError) as e:
        print(f"diffad {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 1


def _train(args) -> int:
    import dataclasses

    from .models.synthesis import SynthesisConfig
    from .models.training import LEARNING_RATES, TrainConfig, train

    if args.max_steps is None and args.max_minutes is None:
        raise ValueError("give a budget: --max-steps, --max-minutes or both")
    unet_lr, seg_lr = LEARNING_RATES[args.preset]
    cfg = TrainConfig(
        batch_size=args.batch_size, unet_lr=args.unet_lr or unet_lr, segmentation_lr=args.seg_lr or seg_lr,
        max_steps=args.max_steps, max_minutes=args.max_minutes, seed=args.seed, workers=args.workers,
        checkpoint_every=args.checkpoint_every, bf16=not args.no_bf16,
        synthesis=dataclasses.replace(SynthesisConfig(), foreground=args.foreground, texture_dir=args.texture_dir),
    )
    summary = train(args.data_dir, args.out, args.preset, args.image_size, args.channels, cfg, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0


def _evaluate(args) -> int:
    from .models.evaluation import evaluate_run

    result = evaluate_run(args.model, args.data_dir, args.json, args.batch_size, args.calibration, args.quantile)
    print(json.dumps(result, indent=2))
    return 0


def _presets() -> int:
    from .models.diffusionad import DiffusionAD
    from .models.presets import PRESET_NAMES, describe, preset

    rows = []
    for name in PRESET_NAMES:
        cfg = preset(name)
        rows.append({"preset": name, "image_size": cfg.image_size, **describe(DiffusionAD(cfg))})
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

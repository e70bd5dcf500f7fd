"""fp16 / bf16 against fp32 on real images: how far the served reduced-precision pipeline moves the maps,
the scores and the metrics of a trained model.

The reduced precision is what the torch backend serves (DiffusionAD.set_network_dtype: the UNet and the
segmentation network in fp16 or bf16, the rest of the pipeline in fp32; channels-last on a GPU). Both
passes run on the same images in the same process, one after the other. Usage:

    python -m diffad.benchmarks.precision RUN_DIR_OR_MODEL DATA_DIR --device cuda --precision fp16
    python -m diffad.benchmarks.precision RUN_DIR_OR_MODEL DATA_DIR --precision bf16   # a CPU with native bf16
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from .quality import METRICS
from .throughput import NETWORK_DTYPES, emit, machine


def compare_precisions(model, data_dir: str | Path, precision: str, device: str = "cpu", batch_size: int = 8,
                       progress: bool = True) -> dict:
    """The test set through fp32 and through `precision`; their differences and both sets of metrics."""
    import torch
    from scipy.stats import spearmanr

    from ..evaluation.evaluate import predict, read_test_set
    from ..evaluation.metrics import compute_metrics

    if precision not in NETWORK_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(NETWORK_DTYPES)}, got {precision!r}")
    if device == "cpu" and precision == "fp16":
        raise ValueError("fp16 is a GPU format (the CPU emulates it): use --precision bf16 or --device cuda")
    cfg = model.config
    test = read_test_set(data_dir, cfg.image_size, cfg.in_channels, progress)
    model = model.to(device).eval()
    runs = {}
    for name in ("fp32", precision):
        if name != "fp32":
            model.set_network_dtype(getattr(torch, NETWORK_DTYPES[name]))
            if device.startswith("cuda"):
                model = model.to(memory_format=torch.channels_last)
        if device.startswith("cuda"):  # fp32 means fp32: no TF32 tensor cores
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        started = time.monotonic()
        maps, scores = predict(model, test.images, batch_size, f"{name} on {device}", progress)  # inference mode
        runs[name] = {"maps": maps, "scores": scores, "seconds": time.monotonic() - started}
    reference, reduced = runs["fp32"], runs[precision]
    map_diff = np.abs(reduced["maps"] - reference["maps"])
    score_diff = np.abs(reduced["scores"] - reference["scores"])
    metrics = {}
    for name, run in runs.items():
        figures = compute_metrics(test.labels, run["scores"], test.masks, run["maps"])
        metrics[name] = {k: round(float(figures[k]), 4) for k in METRICS}
    return {
        "data_dir": str(data_dir), "preset": cfg.name, "image_size": cfg.image_size, "device": device,
        "precision": precision, "num_test_images": len(test.labels), "num_anomalous": int(test.labels.sum()),
        "map_max_abs_diff": float(map_diff.max()), "map_mean_abs_diff": float(map_diff.mean()),
        "score_max_abs_diff": float(score_diff.max()), "score_mean_abs_diff": float(score_diff.mean()),
        # do the two precisions rank the images alike?
        "score_spearman": float(spearmanr(reference["scores"], reduced["scores"]).statistic),
        "metrics": metrics,
        "seconds": {name: round(run["seconds"], 2) for name, run in runs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    from ..models.checkpoint import load_model

    p = argparse.ArgumentParser(prog="python -m diffad.benchmarks.precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a training run folder or a model file")
    p.add_argument("data_dir", help="an MVTec-layout category with test/ and ground_truth/")
    p.add_argument("--precision", default="fp16", choices=sorted(NETWORK_DTYPES))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    try:
        result = compare_precisions(load_model(args.model), args.data_dir, args.precision, args.device,
                                    args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "diffad.benchmarks.precision", *(sys.argv[1:] if argv is None else argv)])
    emit({"command": command, "machine": machine(), "model": str(args.model), **result}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Score trained runs on common validation sets: compare runs whose own validation sets differ.

Each run is validated during training on anomalies drawn from its own anomaly sources, so two runs trained
with different sources are scored on different tasks and their validation figures do not compare. This
builds one validation set per `--sources` list, exactly as training builds its own (the same held-out good
images, the same fixed seed), and scores every run on every set. Test labels are never read.

    python bench/validation_check.py ../shared/datasets/magnetic_tile runs/bench/magnetic_tile_small_seed0 \\
        runs/bench/magnetic_tile_small_shade_seed0 --sources self,procedural,blur,restyle \\
        --sources self,procedural,blur,restyle,shade --json bench/results/tuning/magnetic_tile_shade_validation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from diffad.benchmarks.throughput import emit, machine
from diffad.models import checkpoint as ckpt
from diffad.training.data import find_train_images, read_images
from diffad.training.synthesis import ANOMALY_REGIONS, estimate_foreground, parse_perlin_scales, parse_sources
from diffad.training.trainer import _train_config_from_dict, split_validation, validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("runs", type=Path, nargs="+", help="run folders, all trained on data_dir")
    parser.add_argument("--sources", action="append", required=True,
                        help="a comma-separated list of anomaly sources: one validation set (repeat the flag)")
    parser.add_argument("--perlin-scales", action="append", metavar="MIN,MAX",
                        help="also vary the anomaly regions' Perlin scales (repeat the flag): one validation set "
                        "per sources list and scale range (default: the first run's)")
    parser.add_argument("--anomaly-regions", action="append", choices=ANOMALY_REGIONS,
                        help="also vary the anomaly regions (repeat the flag): one validation set per sources list, "
                        "scale range and regions (default: the first run's)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    configs = [(run, json.loads((run / ckpt.CONFIG_FILE).read_text())) for run in args.runs]
    first = _train_config_from_dict(configs[0][1]["train"])
    models = {str(run): ckpt.load_model(run).eval() for run, _ in configs}
    sizes = {(m.config.image_size, m.config.in_channels) for m in models.values()}
    if len(sizes) != 1:
        raise SystemExit(f"the runs differ in input size or channels: {sorted(sizes)}")
    (size, channels), = sizes
    paths = find_train_images(args.data_dir)
    images = read_images(paths, size, channels)
    foregrounds = (np.stack([estimate_foreground(im) for im in images])
                   if first.synthesis.foreground == "auto" else None)

    results = {}
    scale_ranges = args.perlin_scales or [None]
    regions = args.anomaly_regions or [first.synthesis.regions]
    for text, scales, region in [(t, r, g) for t in args.sources for r in scale_ranges for g in regions]:
        synthesis = dataclasses.replace(first.synthesis, sources=parse_sources(text), regions=region,
                                        **parse_perlin_scales(scales))
        *_, vset, _ = split_validation(args.data_dir, paths, images, foregrounds, channels,
                                       first.validation_fraction, synthesis)
        label = (",".join(synthesis.sources) + f" @ perlin 2**{synthesis.min_scale_log2}..2**{synthesis.max_scale_log2}"
                 + f", {synthesis.regions} region{'s' if synthesis.regions == 'all' else ''}")
        results[label] = {
            "validation": vset.source, "images": len(vset),
            "runs": {run: validate(model, vset) for run, model in models.items()}}
    out = {"data_dir": str(args.data_dir), "sets": results,
           "run_sources": {str(run): saved["train"]["synthesis"]["sources"] for run, saved in configs},
           "run_perlin_scales_log2": {str(run): [saved["train"]["synthesis"]["min_scale_log2"],
                                                 saved["train"]["synthesis"]["max_scale_log2"]]
                                      for run, saved in configs},
           "run_anomaly_regions": {str(run): saved["train"]["synthesis"].get("regions", "all")
                                   for run, saved in configs},
           "machine": machine()}
    emit({"command": shlex.join(["python", *sys.argv]), **out}, args.json)


if __name__ == "__main__":
    main()

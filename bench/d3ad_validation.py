"""Score D3AD settings on a run's own validation set, to choose among them without test labels.

The validation set is rebuilt as training built it (the same held-out good images, the same fixed-seed
synthetic anomalies). The per-image level's bins come from the one-step scores of the same held-out good
images, as `diffad export --mode d3ad` makes them. Each row: validation image AUROC, pixel AUROC, pixel AP
and their mean (the score training selects checkpoints by), and seconds per image. With --difference-map,
each reconstruction is also scored with a pixel-difference map instead of the segmentation network's:
|x - reconstruction| averaged over channels in the networks' units, unsmoothed and smoothed (sigma 2),
scored as the model scores its map (the top-k mean). With --distances, each row also gives how far the
reconstruction lies from the input, mean |x - reconstruction| in the networks' units, inside the synthetic
anomalies and on the good images: what the segmentation network has to tell apart. With
--input-as-reconstruction, a row with the input fed as its own reconstruction (no UNet at all) shows how
much of the map the reconstruction carries.

    python bench/d3ad_validation.py ../shared/datasets/dagm_class1 runs/bench/dagm_class1_small_seed0 \\
        --w 1,4 --max-step 64,128 --json bench/results/tuning/dagm_class1_d3ad_validation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffad.benchmarks.throughput import emit, machine
from diffad.evaluation.d3ad import one_step_bin_edges
from diffad.evaluation.evaluate import predict, reconstruction_method
from diffad.models import checkpoint as ckpt
from diffad.models.d3ad import D3ADConfig
from diffad.models.diffusionad import smooth_map_at
from diffad.training.trainer import run_validation_set, validation_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("run", type=Path, help="a run folder trained on data_dir")
    parser.add_argument("--w", default="4", help="comma-separated guidance weights (default 4, the paper's)")
    parser.add_argument("--max-step", default="128", help="comma-separated highest levels (default 128)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    parser.add_argument("--difference-map", action="store_true",
                        help="also score each reconstruction with a pixel-difference map")
    parser.add_argument("--distances", action="store_true",
                        help="also give mean |x - reconstruction| inside the anomalies and on good images")
    parser.add_argument("--input-as-reconstruction", action="store_true",
                        help="also a row that feeds the segmentation network the input as its own reconstruction: "
                             "how much of the map comes from the reconstruction at all")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    model = ckpt.load_model(args.run).eval()
    vset = run_validation_set(args.run, args.data_dir, model.config.image_size, model.config.in_channels)
    good = vset.images[vset.labels == 0]

    def difference_maps(reconstruct, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = [], []
        with torch.inference_mode():
            for start in range(0, len(vset), 8):
                batch = torch.from_numpy(np.ascontiguousarray(vset.images[start:start + 8].transpose(0, 3, 1, 2)))
                x = model.normalize(batch)
                difference = (x - (reconstruct or model.reconstruct)(x)).abs().mean(dim=1, keepdim=True)
                difference = smooth_map_at(difference, sigma)
                maps.append(difference[:, 0].numpy())
                scores.append(model.score(difference).numpy())
        return np.concatenate(maps), np.concatenate(scores)

    def row(name: str, d3ad: D3ADConfig | None, reconstruct=None) -> list[dict]:
        if d3ad is not None:
            reconstruct = reconstruction_method(model, "d3ad", d3ad=d3ad)
        started = time.perf_counter()
        outputs = {"segmentation": predict(model, vset.images, 8, desc=name, reconstruct=reconstruct)}
        seconds = (time.perf_counter() - started) / len(vset)
        distances = {}
        if args.difference_map or args.distances:
            difference = difference_maps(reconstruct, 0.0)
            if args.difference_map:
                outputs["difference sigma 0"] = difference
                outputs["difference sigma 2"] = difference_maps(reconstruct, 2.0)
            if args.distances:
                inside = vset.masks.astype(bool)
                good_images = vset.labels == 0
                distances = {"distance_inside_anomalies": round(float(difference[0][inside].mean()), 4),
                             "distance_good_images": round(float(difference[0][good_images].mean()), 4)}
        results = []
        for map_kind, (maps, scores) in outputs.items():
            metrics = validation_metrics(vset, maps, scores)
            result = {"method": name, "map": map_kind, **{k: round(v, 4) for k, v in metrics.items()},
                      "seconds_per_image": round(seconds, 4), **distances}
            if d3ad is not None:
                result["d3ad"] = dataclasses.asdict(d3ad)
            print(json.dumps({k: result[k] for k in ("method", "map", "score", "image_auroc", "pixel_auroc",
                                                     "pixel_ap", *distances)}), file=sys.stderr, flush=True)
            results.append(result)
        return results

    edges = one_step_bin_edges(model, good)
    rows = row("one-step", None)
    if args.input_as_reconstruction:
        rows += row("the input as its reconstruction", None, reconstruct=lambda x: x)
    for w in (float(v) for v in args.w.split(",")):
        for max_step in (int(v) for v in args.max_step.split(",")):
            base = D3ADConfig(steps=args.steps, w=w, max_step=max_step)
            rows += row(f"d3ad-fixed w{w:g} T{max_step}", dataclasses.replace(base, mode="fixed"))
            rows += row(f"d3ad w{w:g} T{max_step}", dataclasses.replace(base, mode="dynamic", bin_edges=edges))
    emit({"command": shlex.join(["python", *sys.argv]), "data_dir": str(args.data_dir), "run": str(args.run),
          "validation": vset.source, "images": len(vset), "anomalous": int(vset.labels.sum()), "rows": rows,
          "machine": machine()}, args.json)


if __name__ == "__main__":
    main()

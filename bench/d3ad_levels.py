"""Which start step D3AD's per-image rule gives a run's test images, good and defective apart (the bins from
the run's held-out good images, as `diffad export --mode d3ad` makes them). Prints one JSON line.

    python bench/d3ad_levels.py runs/bench/dagm_class1_small_seed0 ../shared/datasets/dagm_class1
"""
import json
import shlex
import sys
from collections import Counter

import numpy as np
import torch
from diffad.benchmarks.throughput import machine
from diffad.evaluation.d3ad import good_images_for, one_step_bin_edges, read_good_images
from diffad.evaluation.evaluate import read_test_set
from diffad.models import checkpoint as ckpt
from diffad.models.d3ad import D3ADConfig

run, data = sys.argv[1], sys.argv[2]
model = ckpt.load_model(run).eval()
good = read_good_images(good_images_for(run), model)
d3ad = D3ADConfig(mode="dynamic", bin_edges=one_step_bin_edges(model, good, progress=False))
model.set_d3ad(d3ad)
test = read_test_set(data, model.config.image_size, model.config.in_channels, progress=False)
with torch.inference_mode():
    batches = [np.ascontiguousarray(test.images[i:i + 16].transpose(0, 3, 1, 2))
               for i in range(0, len(test.images), 16)]
    starts = torch.cat([model.d3ad_start_steps(torch.from_numpy(b)) for b in batches]).numpy()
out = {"command": shlex.join(["python", *sys.argv]), "machine": machine(), "run": run, "bin_edges": d3ad.bin_edges,
       "start_steps": {
    "good": dict(sorted(Counter(starts[test.labels == 0].tolist()).items())),
    "defective": dict(sorted(Counter(starts[test.labels == 1].tolist()).items()))}}
print(json.dumps(out))

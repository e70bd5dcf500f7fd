"""`make demo`'s pieces: the demo category generator's command line and the Makefile's chain of targets.

The demo itself (a few minutes of training) is run by hand; these are the cheap parts.
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from diffad.training.data import find_train_images
from diffad.training.demo_data import DEFECT_TYPES, main
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_demo_data_writes_a_category_and_two_new_samples(tmp_path, capsys):
    category = tmp_path / "demo-data" / "weave"
    assert main([str(category), "--size", "32", "--num-train", "3", "--num-test-good", "2",
                 "--num-test-defect", "1", "--samples", str(tmp_path / "demo-data")]) == 0
    assert len(find_train_images(category)) == 3
    assert len(list((category / "test" / "good").glob("*.png"))) == 2
    for kind in DEFECT_TYPES:
        assert [p.name for p in (category / "test" / kind).glob("*.png")] == ["000.png"]
        assert [p.name for p in (category / "ground_truth" / kind).glob("*.png")] == ["000_mask.png"]
    images = {p: np.asarray(Image.open(p)) for p in category.rglob("*.png") if "ground_truth" not in p.parts}
    for name in ("sample_defect.png", "sample_good.png"):
        sample = np.asarray(Image.open(tmp_path / "demo-data" / name))
        assert sample.shape == (32, 32, 3)  # RGB by default
        assert not any(np.array_equal(sample, image) for image in images.values()), f"{name} is in the category"
    assert "sample_defect.png" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_generates_trains_evaluates_exports_then_serves(tmp_path):
    """A dry run: the steps in order, on the port asked for; nothing is built or started."""
    dry = subprocess.run(["make", "-n", "-B", "demo", "PORT=8123", "VENV=" + str(tmp_path / "venv")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    steps = ["-m diffad.training.demo_data runs/demo-data/weave --samples runs/demo-data --num-validation 32",
             "diffad train runs/demo-data/weave --out runs/demo --preset small --image-size 64 --crop 0 "
             "--max-steps 600",
             "diffad evaluate runs/demo runs/demo-data/weave",
             "diffad export runs/demo --out bundles/demo --overwrite",
             "diffad serve bundles/demo --host 127.0.0.1 --port 8123"]
    text = " ".join(dry.stdout.replace("\\\n", " ").split())
    positions = [text.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), dry.stdout
    assert "--max-minutes" not in text  # a step budget, not a time budget: the model does not depend on speed
    # the hint must not print the service's readiness line itself: a script waiting for it would fire at once
    assert "model demo ready" not in text
    assert "curl -F file=@runs/demo-data/sample_defect.png 'http://localhost:8123/inspect?map=none'" in text

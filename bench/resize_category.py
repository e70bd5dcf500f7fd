"""Copy an MVTec-layout category at a model's input size, for a machine the full-size images cannot reach.

Every image is written as diffad reads it (training/data.py: its mode, then a bilinear resize to SIZE x SIZE)
and every mask as evaluation reads it (binarised, nearest-neighbour resize), as lossless PNG under the same
names. Reading the copy at SIZE then gives the very arrays that reading the original gives, so a model
trained and evaluated on the copy at SIZE sees what it would see on the original (at any other size it does
not: the copy is already resized). The folder keeps the category's name, which names the category.

    python bench/resize_category.py ../shared/datasets/dagm_class1 .gpudata/px128 --size 128
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from diffad.training.data import (
    detect_channels,
    find_test_samples,
    find_train_images,
    find_validation_images,
    read_image,
    read_mask,
)
from PIL import Image


def save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.rint(array * 255).astype(np.uint8)
    Image.fromarray(pixels[:, :, 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels).save(path)


def resize_category(data_dir: Path, out_root: Path, size: int) -> Path:
    out = out_root / data_dir.resolve().name
    train = find_train_images(data_dir)
    channels = detect_channels(train)
    test = find_test_samples(data_dir)
    for path in train + find_validation_images(data_dir) + [s.path for s in test]:
        save(read_image(path, size, channels), (out / path.relative_to(data_dir)).with_suffix(".png"))
    for sample in test:
        if sample.mask_path is not None:
            save(read_mask(sample.mask_path, size)[:, :, None], out / sample.mask_path.relative_to(data_dir))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="an MVTec-layout category")
    parser.add_argument("out_root", type=Path, help="the copy goes to OUT_ROOT/<category's folder name>")
    parser.add_argument("--size", type=int, required=True, help="the model's square input size")
    args = parser.parse_args()
    print(resize_category(args.data_dir, args.out_root, args.size))


if __name__ == "__main__":
    main()

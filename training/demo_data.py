"""A small synthetic inspection category in MVTec AD layout, generated in code.

Good parts are a woven-looking texture (two gratings with jitter and grain); defects are scratches,
spots and missing patches with exact masks. Tests and the demo model use it, so nothing needs a
download and the project ships no third-party images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEFECT_TYPES = ("scratch", "spot", "patch")


def good_texture(size: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """A woven texture, uint8 [size, size] or [size, size, 3]; every sample varies a little."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    period = 10.0 + rng.uniform(-0.5, 0.5)
    phase = rng.uniform(0, 2 * np.pi, 2)
    warp = 0.02 * np.sin(2 * np.pi * (yy * 2 + rng.uniform()))
    weave = np.sin(2 * np.pi * period * (xx + warp) + phase[0]) * np.sin(2 * np.pi * period * yy + phase[1])
    base = 0.5 + 0.18 * weave + rng.normal(0, 0.03, (size, size))
    base *= rng.uniform(0.92, 1.08)  # lighting varies from part to part
    gray = np.clip(base, 0, 1)
    if channels == 1:
        return (gray * 255).astype(np.uint8)
    tint = np.array([1.0, 0.9, 0.75]) * rng.uniform(0.95, 1.05, 3)
    return (np.clip(gray[:, :, None] * tint, 0, 1) * 255).astype(np.uint8)


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of the given kind; returns (image, mask uint8 0/255)."""
    size = image.shape[0]
    mask_im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_im)
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(0.15, 0.3) * size
        dx, dy = np.cos(angle) * half, np.sin(angle) * half
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=max(2, size // 40))
        value = 0.95
    elif kind == "spot":
        r = rng.uniform(0.05, 0.1) * size
        draw.ellipse([cx - r, cy - r * rng.uniform(0.6, 1.0), cx + r, cy + r], fill=255)
        value = 0.08
    elif kind == "patch":
        r = rng.uniform(0.06, 0.12) * size
        draw.rectangle([cx - r, cy - r, cx + r, cy + r * rng.uniform(0.5, 1.0)], fill=255)
        value = 0.5  # the weave is missing: a flat grey patch
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECT_TYPES}")
    mask = np.asarray(mask_im) > 0
    out = image.astype(np.float32) / 255.0
    m = mask[:, :, None] if out.ndim == 3 else mask
    out = np.where(m, value + rng.normal(0, 0.02, out.shape), out)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8), (mask * 255).astype(np.uint8)


def make_category(root: str | Path, size: int = 64, channels: int = 1, num_train: int = 40,
                  num_test_good: int = 8, num_test_defect: int = 4, num_validation: int = 0,
                  seed: int = 0) -> Path:
    """Write a category: train/good, test/good, test/<defect>, ground_truth/<defect>, validation/good."""
    root = Path(root)
    rng = np.random.default_rng(seed)

    def save(folder: Path, name: str, array: np.ndarray) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / name)

    for i in range(num_train):
        save(root / "train" / "good", f"{i:03d}.png", good_texture(size, rng, channels))
    for i in range(num_validation):
        save(root / "validation" / "good", f"{i:03d}.png", good_texture(size, rng, channels))
    for i in range(num_test_good):
        save(root / "test" / "good", f"{i:03d}.png", good_texture(size, rng, channels))
    for kind in DEFECT_TYPES:
        for i in range(num_test_defect):
            image, mask = add_defect(good_texture(size, rng, channels), kind, rng)
            save(root / "test" / kind, f"{i:03d}.png", image)
            save(root / "ground_truth" / kind, f"{i:03d}_mask.png", mask)
    return root


def write_samples(out_dir: str | Path, size: int = 64, channels: int = 1, seed: int = 0,
                  defect: str = "spot") -> list[Path]:
    """Write OUT_DIR/sample_defect.png and OUT_DIR/sample_good.png: new parts, in no split of the category."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])  # a stream of its own: these images are in no split
    defective, _ = add_defect(good_texture(size, rng, channels), defect, rng)
    samples = []
    for name, array in (("sample_defect.png", defective), ("sample_good.png", good_texture(size, rng, channels))):
        Image.fromarray(array).save(out_dir / name)
        samples.append(out_dir / name)
    return samples


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m diffad.training.demo_data",
        description="Write a synthetic woven-texture category in MVTec AD layout (train/good, test/good, "
        f"test/<defect>, ground_truth/<defect>; defects: {', '.join(DEFECT_TYPES)}), for `make demo` and for "
        "trying the project without a dataset.")
    parser.add_argument("out", metavar="CATEGORY_DIR", help="folder to write the category into")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1 or 3 (default 3)")
    parser.add_argument("--num-train", type=int, default=60, help="good training images (default 60)")
    parser.add_argument("--num-test-good", type=int, default=16, help="good test images (default 16)")
    parser.add_argument("--num-test-defect", type=int, default=8, help="test images per defect type (default 8)")
    parser.add_argument("--num-validation", type=int, default=0, help="good validation images (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--samples", metavar="DIR",
                        help="also write two new parts, in no split of the category, to try a model with: "
                        "DIR/sample_defect.png (a spot) and DIR/sample_good.png")
    args = parser.parse_args(argv)
    root = make_category(args.out, size=args.size, channels=args.channels, num_train=args.num_train,
                         num_test_good=args.num_test_good, num_test_defect=args.num_test_defect,
                         num_validation=args.num_validation, seed=args.seed)
    print(f"wrote {root}")
    if args.samples:
        for path in write_samples(args.samples, args.size, args.channels, args.seed):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

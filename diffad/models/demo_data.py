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

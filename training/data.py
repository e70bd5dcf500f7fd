"""Finding and reading images: an MVTec AD category or a plain folder of good images.

MVTec AD layout:
    DATA_DIR/train/good/*                       good training images
    DATA_DIR/validation/good/*                  optional good images for threshold calibration
    DATA_DIR/test/good/*, DATA_DIR/test/<defect>/*
    DATA_DIR/ground_truth/<defect>/<stem>_mask.png

Images are returned as float32 H x W x C arrays in [0, 1], resized to the model's square input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class DataError(ValueError):
    """A problem with the user's data; the message names the file or folder."""


@dataclass(frozen=True)
class TestSample:
    path: Path
    label: int                 # 0 good, 1 anomalous
    defect_type: str           # "good" or the defect folder's name
    mask_path: Path | None     # None for good images


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def is_mvtec_layout(data_dir: Path) -> bool:
    return (data_dir / "train" / "good").is_dir()


def find_train_images(data_dir: str | Path) -> list[Path]:
    """train/good of an MVTec category, or every image directly in a plain folder."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder not found: {data_dir}")
    folder = data_dir / "train" / "good" if is_mvtec_layout(data_dir) else data_dir
    images = list_images(folder)
    if not images:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return images


def find_validation_images(data_dir: str | Path) -> list[Path]:
    """validation/good when the category has it (good images kept out of training), else []."""
    folder = Path(data_dir) / "validation" / "good"
    return list_images(folder) if folder.is_dir() else []


def find_test_samples(data_dir: str | Path) -> list[TestSample]:
    """Every test image with its label and, for defects, its mask (which must exist)."""
    data_dir = Path(data_dir)
    test_dir = data_dir / "test"
    if not test_dir.is_dir():
        raise DataError(f"no test folder in {data_dir} (expected {test_dir}/good and {test_dir}/<defect>)")
    samples = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        for path in list_images(defect_dir):
            if defect_dir.name == "good":
                samples.append(TestSample(path, 0, "good", None))
                continue
            mask = data_dir / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png"
            if not mask.is_file():
                raise DataError(f"missing mask for {path}: expected {mask}")
            samples.append(TestSample(path, 1, defect_dir.name, mask))
    if not samples:
        raise DataError(f"no test images in {test_dir}")
    if len({s.label for s in samples}) < 2:
        raise DataError(f"{test_dir} needs both good and defective images to measure detection")
    return samples


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, EXIF orientation applied; DataError naming the file otherwise."""
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except Exception as e:  # Pillow raises many types for broken files
        raise DataError(f"cannot read image {path}: {e}") from e


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode (16-bit, palette, RGBA, CMYK, ...) to L or RGB."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale to 8 bits by the full range of the type, not by clipping.
        a = np.asarray(im, dtype=np.float32)
        im = Image.fromarray((a / (65535.0 if a.max() > 255 else 255.0) * 255.0).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels become black, as a part on a dark background.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, rgba)
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)  # convert() to its own mode would copy the picture


def read_image(path: str | Path, size: int, channels: int) -> np.ndarray:
    """An image as float32 [size, size, channels] in [0, 1]."""
    im = to_mode(open_image(Path(path)), channels)
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    a = np.asarray(im, dtype=np.float32) / 255.0
    return a[:, :, None] if a.ndim == 2 else a


def read_mask(path: str | Path, size: int) -> np.ndarray:
    """A ground-truth mask as float32 [size, size] in {0, 1}: anything > 0 is a defect."""
    im = open_image(Path(path))
    binary = Image.fromarray((np.asarray(im.convert("L")) > 0).astype(np.uint8) * 255)
    if binary.size != (size, size):
        binary = binary.resize((size, size), Image.Resampling.NEAREST)
    return (np.asarray(binary) > 0).astype(np.float32)


def is_grayscale(path: Path) -> bool:
    im = open_image(path)
    if im.mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F", "LA"):
        return True
    rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    # JPEG chroma noise makes grey images differ by a few levels between channels.
    return int(np.abs(rgb - rgb[:, :, :1]).max()) <= 8


def detect_channels(paths: list[Path], sample: int = 16) -> int:
    """1 if the (first `sample`) images are all grayscale, else 3."""
    return 1 if all(is_grayscale(p) for p in paths[:sample]) else 3


def read_images(paths: list[Path], size: int, channels: int) -> np.ndarray:
    """Stack of images, [N, size, size, channels] float32."""
    return np.stack([read_image(p, size, channels) for p in paths])

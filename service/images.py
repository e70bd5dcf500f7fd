"""Uploads to model input, anomaly maps to PNG: Pillow only, run in worker threads.

An upload is checked in the order that costs least: its declared content type, then its header (format
and dimensions, read without decoding the pixels), and only then decoded. So a decompression bomb (a
small file that claims billions of pixels) is refused before any memory is spent on it, per request and
against the service's own limit rather than Pillow's process-wide warning threshold.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..training.data import to_mode  # numpy and Pillow only: no torch on the serving path

ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
ACCEPTED_CONTENT_TYPES = frozenset({
    "image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/bmp", "image/x-bmp", "image/x-ms-bmp",
    "image/tiff", "image/tif",
})
# A JPEG at least this many times the model's side is decoded at a reduced DCT scale (1/2, 1/4 or 1/8),
# never below this multiple: a fraction of the memory and time, and a bilinear resize from 4x its target
# differs from one from full resolution by well under a grey level.
JPEG_DRAFT_FACTOR = 4
# EXIF orientations that turn the picture by 90 degrees (its width and height swap).
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
# Sent by clients that do not know the type (curl for unknown extensions, some SDKs): the header decides.
UNTYPED_CONTENT_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})


class ImageError(ValueError):
    """An upload the service refuses; status_code is the HTTP answer (400, 413 or 415)."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    array: np.ndarray   # uint8, channels x size x size: one item of the model's NCHW batch
    width: int          # the upload's own size, after its EXIF orientation is applied
    height: int
    format: str
    decoded_size: tuple[int, int]  # what was decoded: a large JPEG at a reduced DCT scale


def check_content_type(content_type: str | None) -> None:
    """415 for a declared type that is not one of the accepted image types."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    if base not in ACCEPTED_CONTENT_TYPES and base not in UNTYPED_CONTENT_TYPES:
        raise ImageError(415, f"unsupported content type {base[:64]!r}: send PNG, JPEG, BMP or TIFF")


def decode_image(data: bytes, size: int, channels: int, max_pixels: int) -> DecodedImage:
    """The upload as the model's input: oriented, converted to `channels`, resized (bilinear) to size."""
    if not data:
        raise ImageError(400, "the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            if image.format not in ACCEPTED_FORMATS:
                raise ImageError(415, f"unsupported image format {image.format}: send PNG, JPEG, BMP or TIFF")
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(413, f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
            if image.format == "JPEG" and min(width, height) >= JPEG_DRAFT_FACTOR * size:
                image.draft(None, (JPEG_DRAFT_FACTOR * size, JPEG_DRAFT_FACTOR * size))
            if image.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
            image.load()
            fmt = image.format
            # In place and converted only when needed: a 7000x7000 RGB upload is 147 MB, each copy as much again.
            ImageOps.exif_transpose(image, in_place=True)
            decoded_size = image.size
            try:
                converted = to_mode(image, channels)  # the training's own conversion: 16-bit, palette, alpha, CMYK
            except ValueError as e:  # a mode Pillow cannot convert (LAB to L, say)
                raise ImageError(415, f"unsupported pixel mode {image.mode}: {str(e)[:200]}") from e
            resized = converted.resize((size, size), Image.Resampling.BILINEAR)  # as in training (training/data.py)
            del converted
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit trips first for the largest claims
        raise ImageError(413, f"image exceeds the limit of {max_pixels} pixels (its header claims far more)") from e
    except UnidentifiedImageError as e:
        raise ImageError(400, "the upload is not an image that can be decoded (PNG, JPEG, BMP or TIFF)") from e
    except Exception as e:  # truncated or corrupt data: Pillow's decoders raise many types
        raise ImageError(400, f"the image cannot be decoded: {type(e).__name__}: {str(e)[:200]}") from e
    array = np.asarray(resized, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return DecodedImage(np.ascontiguousarray(array), width, height, fmt, decoded_size)


def map_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The returned map's size: the image's own, scaled down (aspect kept) to at most max_pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = (max_pixels / (width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


def encode_map_png(anomaly_map: np.ndarray, width: int, height: int) -> str:
    """A [1, H, W] (or [H, W]) map in [0, 1], resized to width x height, as base64 8-bit PNG (map * 255)."""
    values = np.asarray(anomaly_map, dtype=np.float32).reshape(anomaly_map.shape[-2:])
    # Scaled (and offset by half a level) at the model's resolution, where it costs nothing: bilinear is
    # linear, and Pillow's float-to-8-bit conversion clips and truncates, so this rounds to the nearest level
    # without the full-size float copies a numpy round and clip would make (64 MB each for a 4000x4000 map).
    scaled = Image.fromarray(values * np.float32(255.0) + np.float32(0.5), "F")
    pixels = scaled.resize((width, height), Image.Resampling.BILINEAR).convert("L")
    buffer = io.BytesIO()
    pixels.save(buffer, "PNG", compress_level=3)  # level 3: near-best size, far faster
    return base64.b64encode(buffer.getvalue()).decode("ascii")

"""On-the-fly synthetic anomalies for training (DRAEM / DiffusionAD style), fully offline.

An anomaly is made from a good image in three steps:

1. a binary region from thresholded, randomly scaled and rotated Perlin noise, restricted to the
   object (foreground) so that defects do not land on the empty background;
2. an anomaly *source* image: a strip-shuffled, photometrically altered copy of the image itself
   ("self"), a blurred, darkened or lightened copy of it ("smudge": stains, wear, dirt, an out-of-focus
   spot), the image with its texture smoothed away but its local brightness kept ("blur": polished,
   worn or blurred patches, as DAGM's defects are), a self or procedural source re-standardised to the
   image's own mean and contrast ("restyle": a foreign structure that does not stand out by brightness),
   the image itself a little darker or lighter, its texture kept ("shade": an unevenly finished or lit
   region, opt in),
   a texture generated in code ("procedural"), or a texture file ("texture");
3. the blend ``out = (1 - m) * image + m * ((1 - beta) * image + beta * source)`` with a random
   opacity ``beta``; a smudge's or blur's opacity reaches 1 inside and fades towards the mask's border
   (such defects have no sharp edge).

Everything is NumPy (plus scipy / scikit-image / Pillow) and every random choice comes from the
``numpy.random.Generator`` passed in, so a seed reproduces a sample exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import draw
from skimage.filters import threshold_otsu

__all__ = [
    "SynthesisConfig",
    "AnomalySynthesizer",
    "perlin_noise",
    "perlin_mask",
    "estimate_foreground",
    "self_augmentation_source",
    "smudge_source",
    "blur_source",
    "restyle_source",
    "shade_source",
    "procedural_texture",
    "parse_sources",
]

KNOWN_SOURCES = ("self", "smudge", "blur", "restyle", "shade", "procedural", "texture")
# Sources painted as soft-edged regions: coarse Perlin masks (at most 2**n cells per axis: a smudge or blur
# is a blob, a shade a large region), opacity feathered towards the border.
_COARSEST_SCALE_LOG2 = {"smudge": 3, "blur": 3, "shade": 2}
_SOFT_SOURCES = tuple(_COARSEST_SCALE_LOG2)
# Their opacity deep inside the blob: up to fully replaced.
_SOFT_OPACITY = (0.5, 1.0)
TEXTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}

# A new Perlin mask is drawn this many times at most before giving up on an anomaly.
_MASK_ATTEMPTS = 5
# ITU-R BT.601 luminance weights, used wherever colour has to become grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class SynthesisConfig:
    probability: float = 0.5  # fraction of samples that get an anomaly
    min_scale_log2: int = 0  # Perlin scales per axis drawn from 2**min .. 2**max (inclusive)
    max_scale_log2: int = 5
    threshold: float = 0.5  # Perlin noise > threshold -> anomaly
    opacity_range: tuple[float, float] = (0.1, 0.8)  # beta ~ U[low, high) (soft sources: _SOFT_OPACITY)
    # Which sources to draw from, uniformly; "smudge" opt in. blur and restyle: faint, brightness-keeping
    # defects like the real ones (README, "Synthetic anomalies").
    sources: tuple[str, ...] = ("self", "procedural", "blur", "restyle")
    texture_dir: str | None = None  # optional folder of texture images; adds source "texture"
    foreground: str = "auto"  # "auto" (estimate) or "none" (whole image, for textures)
    min_mask_fraction: float = 0.001  # retry when the mask inside the foreground is smaller
    # "all": every region of the thresholded noise; "one": a single connected region of it, chosen at
    # random (one small, isolated defect, as a tire's cut or hole, instead of a scatter of blobs).
    regions: str = "all"


# --------------------------------------------------------------------------------------------
# Perlin noise and masks
# --------------------------------------------------------------------------------------------


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic 6t^5 - 15t^4 + 10t^3: zero first and second derivative at cell borders."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _gradient_noise(py: np.ndarray, px: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Perlin noise sampled at lattice coordinates ``(py, px)`` (non-negative, broadcastable).

    A fresh lattice of random unit gradients is drawn, just large enough to cover the coordinates.
    The result is scaled by sqrt(2) so that it spans roughly [-1, 1].
    """
    py, px = np.asarray(py, dtype=np.float32), np.asarray(px, dtype=np.float32)
    floor_y, floor_x = np.floor(py), np.floor(px)
    iy, ix = floor_y.astype(np.intp), floor_x.astype(np.intp)
    fy, fx = py - floor_y, px - floor_x  # position inside the cell, float32

    cols = int(ix.max()) + 2
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(int(iy.max()) + 2) * cols)
    grad_y = np.cos(angles).astype(np.float32)
    grad_x = np.sin(angles).astype(np.float32)
    cell = iy * cols + ix  # flat index of each pixel's top-left lattice corner (flat take is fast)

    def corner(dy: int, dx: int) -> np.ndarray:
        # Dot product of the corner's gradient with the offset from that corner.
        index = cell + (dy * cols + dx)
        return grad_y.take(index) * (fy - dy) + grad_x.take(index) * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    top = n00 + ux * (n01 - n00)
    bottom = n10 + ux * (n11 - n10)
    return (top + uy * (bottom - top)) * np.float32(np.sqrt(2.0))


def perlin_noise(shape: tuple[int, int], scale: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin noise of ``shape`` with ``scale`` lattice cells per axis; float32, about [-1, 1].

    Pixels are mapped onto the lattice continuously, so ``shape`` need not be divisible by ``scale``.
    """
    h, w = int(shape[0]), int(shape[1])
    sy, sx = int(scale[0]), int(scale[1])
    if h < 1 or w < 1 or sy < 1 or sx < 1:
        raise ValueError(f"shape and scale must be positive, got shape={shape}, scale={scale}")
    py = (np.arange(h, dtype=np.float32) * (sy / h))[:, None]
    px = (np.arange(w, dtype=np.float32) * (sx / w))[None, :]
    return _gradient_noise(py, px, rng)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, config: SynthesisConfig) -> np.ndarray:
    """Boolean HxW anomaly region: thresholded Perlin noise at random scales and rotation.

    The rotation (-90..90 degrees) is applied to the sampling coordinates rather than to a noise
    image, which is exact and leaves no empty corners to fill.
    """
    h, w = int(shape[0]), int(shape[1])
    sy = 2 ** int(rng.integers(config.min_scale_log2, config.max_scale_log2 + 1))
    sx = 2 ** int(rng.integers(config.min_scale_log2, config.max_scale_log2 + 1))
    theta = np.deg2rad(rng.uniform(-90.0, 90.0))
    cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))

    yy = (np.arange(h, dtype=np.float32) - (h - 1) / 2.0)[:, None]
    xx = (np.arange(w, dtype=np.float32) - (w - 1) / 2.0)[None, :]
    py = (cos * yy - sin * xx) * (sy / h)
    px = (sin * yy + cos * xx) * (sx / w)
    noise = _gradient_noise(py - py.min(), px - px.min(), rng)
    return noise > config.threshold


ANOMALY_REGIONS = ("all", "one")
_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def one_region(mask: np.ndarray, min_pixels: float, rng: np.random.Generator) -> np.ndarray:
    """One connected region (8-neighbour) of a boolean mask, chosen at random among those of at least
    `min_pixels`; all False when there is none."""
    labels, count = ndimage.label(mask, structure=_EIGHT_NEIGHBOURS)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    big_enough = np.flatnonzero(sizes >= min_pixels) + 1
    if len(big_enough) == 0:
        return np.zeros_like(mask, dtype=bool)
    return labels == big_enough[int(rng.integers(0, len(big_enough)))]


# --------------------------------------------------------------------------------------------
# Foreground estimation
# --------------------------------------------------------------------------------------------

# A pixel stands out from the background when its feature exceeds this multiple of the border's
# 99th percentile; an image is an object on a background when at least this share of its interior does.
_STANDOUT_FACTOR = 1.5
_MIN_STANDOUT_SHARE = 0.05
_NOISE_FLOOR = 0.02
# A plausible object covers between these shares of the image.
_MIN_OBJECT_SHARE, _MAX_OBJECT_SHARE = 0.05, 0.95
# Foreground estimation runs on a copy subsampled to at most this many pixels per side.
_FOREGROUND_MAX_SIDE = 128


def _as_hwc(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an HxWxC image with C in (1, 3), got shape {image.shape}")
    return image


def estimate_foreground(image: np.ndarray) -> np.ndarray:
    """Boolean HxW object mask for an object on a plain background, else all True.

    Heuristic: the background colour is the median of a thin border band. If most of the border is
    not close to that colour, the image is a texture (or a frame-filling object) and the whole
    image is foreground. Otherwise the per-pixel distance to the background colour is thresholded
    with Otsu, cleaned (opening, closing, hole filling) and small components are dropped. A result
    covering < 5 % or > 95 % of the image is not trusted and also gives all True.
    """
    image = _as_hwc(image)
    h, w, _ = image.shape
    # Otsu and morphology dominate the cost; a subsampled copy is plenty for placing anomalies.
    step = -(-max(h, w) // _FOREGROUND_MAX_SIDE)
    if step <= 1:
        return _foreground_full_resolution(image)
    small = _foreground_full_resolution(image[::step, ::step])
    return small[(np.arange(h) // step)[:, None], (np.arange(w) // step)[None, :]]


def _foreground_full_resolution(image: np.ndarray) -> np.ndarray:
    h, w, _ = image.shape
    everything = np.ones((h, w), dtype=bool)

    band = max(1, min(h, w) // 16)
    border_mask = np.zeros((h, w), dtype=bool)
    border_mask[:band], border_mask[-band:], border_mask[:, :band], border_mask[:, -band:] = (True,) * 4

    # Feature: colour distance to the background (after smoothing, so a texture's own pattern does not
    # count) plus local contrast (so a dark object with edges stands out from a dark, smooth background).
    sigma = max(1.0, min(h, w) / 64)
    smooth = ndimage.gaussian_filter(image, (sigma, sigma, 0))
    background = np.median(smooth[border_mask], axis=0)
    distance = np.sqrt(np.mean((smooth - background) ** 2, axis=-1))
    gray = image.mean(axis=-1)
    contrast = ndimage.gaussian_filter(np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1)), 2 * sigma)
    feature = distance + contrast

    # A texture (or a frame-filling object) looks the same at the border as inside: all foreground.
    # The floor stands for sensor noise: a perfectly flat synthetic border would make any blur stand out.
    reference = max(float(np.percentile(feature[border_mask], 99)), _NOISE_FLOOR)
    standout = feature > _STANDOUT_FACTOR * reference + 1e-6
    if standout[~border_mask].mean() < _MIN_STANDOUT_SHARE:
        return everything

    # The outline: Otsu on the colour distance (never below the border's own noise level) where colour
    # separates object and background; else the contrast feature, whose blur reaches past the outline
    # by about its radius, taken back by an erosion.
    threshold = max(float(threshold_otsu(distance)), float(np.percentile(distance[border_mask], 75)))
    foreground = distance > threshold
    if not _MIN_OBJECT_SHARE <= foreground.mean() <= _MAX_OBJECT_SHARE:
        foreground = ndimage.binary_erosion(standout, iterations=max(1, round(2 * sigma)))

    radius = max(1, round(min(h, w) / 100))
    disk = draw.disk((radius, radius), radius + 0.5, shape=(2 * radius + 1, 2 * radius + 1))
    structure = np.zeros((2 * radius + 1, 2 * radius + 1), dtype=bool)
    structure[disk] = True
    foreground = ndimage.binary_opening(foreground, structure)
    foreground = ndimage.binary_closing(foreground, structure, border_value=0)
    foreground = ndimage.binary_fill_holes(foreground)

    labels, count = ndimage.label(foreground)
    if count > 1:
        # Keep components of at least a tenth of the largest: drops specks, keeps sibling objects.
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1
        foreground = np.isin(labels, keep)

    share = float(foreground.mean())
    if share < _MIN_OBJECT_SHARE or share > _MAX_OBJECT_SHARE:
        return everything
    return foreground


# --------------------------------------------------------------------------------------------
# Anomaly sources
# --------------------------------------------------------------------------------------------


def _non_identity_permutation(n: int, rng: np.random.Generator) -> np.ndarray:
    order = rng.permutation(n)
    if n > 1 and np.array_equal(order, np.arange(n)):
        order = np.roll(order, 1)
    return order


def _brightness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return img * rng.uniform(0.5, 1.5)


def _contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mean = img.mean()
    return mean + (img - mean) * rng.uniform(0.4, 1.8)


def _gamma(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img, 0.0, 1.0) ** rng.uniform(0.4, 2.5)


def _channel_shuffle(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return img[..., _non_identity_permutation(img.shape[2], rng)]


def _invert(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - img


def _posterize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    levels = 2 ** int(rng.integers(1, 4))  # 2, 4 or 8 grey levels
    return np.minimum(np.floor(np.clip(img, 0.0, 1.0) * levels), levels - 1) / (levels - 1)


def _blur_or_sharpen(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blurred = ndimage.gaussian_filter(img, sigma=(rng.uniform(1.0, 3.0),) * 2 + (0,))
    if rng.random() < 0.5:
        return blurred
    return img + rng.uniform(1.0, 3.0) * (img - blurred)  # unsharp masking


_PHOTOMETRIC_OPS = (_brightness, _contrast, _gamma, _invert, _posterize, _blur_or_sharpen)


def self_augmentation_source(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image itself, photometrically altered (2-3 random ops) and cut into shuffled strips."""
    image = _as_hwc(image)
    ops = _PHOTOMETRIC_OPS + ((_channel_shuffle,) if image.shape[2] == 3 else ())
    chosen = rng.choice(len(ops), size=int(rng.integers(2, 4)), replace=False)
    out = image
    for index in chosen:
        out = np.clip(ops[index](out, rng), 0.0, 1.0)

    # Shuffled strips break the image structure so the source does not just repeat the object.
    axis = int(rng.integers(0, 2))
    count = min(int(rng.integers(2, 9)), out.shape[axis])
    strips = np.array_split(out, count, axis=axis)
    order = _non_identity_permutation(count, rng)
    out = np.concatenate([strips[i] for i in order], axis=axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def smudge_source(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image low-pass filtered (its fine texture gone) and darkened or lightened, like a stain."""
    image = _as_hwc(image)
    sigma = rng.uniform(0.01, 0.04) * min(image.shape[:2]) + 0.5  # relative to the image: any resolution
    out = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0))
    gain = rng.uniform(0.5, 0.9) if rng.random() < 0.7 else rng.uniform(1.1, 1.5)  # stains mostly darken
    return np.clip(out * gain, 0.0, 1.0).astype(np.float32)


def blur_source(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image with its fine texture attenuated around the local mean: brightness kept, texture gone.

    out = local_mean + a * (image - local_mean), a ~ U[0, 0.6): a polished, worn or out-of-focus patch
    changes the texture's energy, not its mean brightness.
    """
    image = _as_hwc(image)
    sigma = rng.uniform(0.01, 0.05) * min(image.shape[:2]) + 0.5
    local_mean = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0))
    return np.clip(local_mean + rng.uniform(0.0, 0.6) * (image - local_mean), 0.0, 1.0).astype(np.float32)


def restyle_source(image: np.ndarray, source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`source` re-standardised per channel to the image's mean and std (the std times U[0.5, 2)).

    A foreign structure at the image's own brightness and contrast: the network must see the pattern,
    not a brightness step.
    """
    image, source = _as_hwc(image), _as_hwc(source)
    axes = (0, 1)
    z = (source - source.mean(axes)) / np.maximum(source.std(axes), 1e-3)
    out = image.mean(axes) + z * image.std(axes) * rng.uniform(0.5, 2.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def shade_source(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image shifted in brightness by U[0.5, 2) of its own spread (darker more often) and its texture
    gain changed by U[0.7, 1.4): the same surface, unevenly finished or lit.

    Real "uneven" defects (magnetic tiles, say) are large regions of the same texture in another shade;
    the other sources either keep the brightness or replace the texture.
    """
    image = _as_hwc(image)
    axes = (0, 1)
    sigma = 0.02 * min(image.shape[:2]) + 0.5
    local_mean = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0))
    sign = -1.0 if rng.random() < 0.6 else 1.0
    shift = sign * rng.uniform(0.5, 2.0) * np.maximum(image.std(axes), 0.01)
    out = local_mean + shift + rng.uniform(0.7, 1.4) * (image - local_mean)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _feathered(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Opacity weights in [0, 1]: 1 deep inside the mask, falling towards its border, 0 outside."""
    sigma = rng.uniform(0.005, 0.02) * min(mask.shape) + 0.5
    return np.where(mask, ndimage.gaussian_filter(mask.astype(np.float32), sigma), 0.0).astype(np.float32)


def _random_palette(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` RGB colours with one dark and one bright entry, so textures never come out flat."""
    colours = rng.random((count, 3))
    colours[0] = rng.uniform(0.0, 0.35, 3)
    colours[1] = rng.uniform(0.65, 1.0, 3)
    return colours[rng.permutation(count)].astype(np.float32)


def _apply_palette(values: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] through a piecewise linear colour ramp -> HxWx3."""
    scaled = np.clip(values, 0.0, 1.0).astype(np.float32) * (len(palette) - 1)
    segment = np.minimum(np.floor(scaled), len(palette) - 2)  # between colours segment, segment + 1
    index = segment.astype(np.intp)
    t = (scaled - segment)[..., None]  # stays float32 (subtracting the int index would not)
    return palette.take(index, axis=0) * (1.0 - t) + palette.take(index + 1, axis=0) * t


def _normalise(values: np.ndarray) -> np.ndarray:
    low, high = values.min(), values.max()
    return (values - low) / max(float(high - low), 1e-6)


def _fractal_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Multi-octave Perlin noise (fBm) through a random colour ramp, sometimes turbulent."""
    finest = max(2, min(h, w) // 2)  # cells of at least 2 px
    scale = int(rng.integers(2, 9))
    total = np.zeros((h, w), dtype=np.float32)
    amplitude = 1.0
    for _ in range(int(rng.integers(4, 6))):
        total += amplitude * perlin_noise((h, w), (min(scale, finest),) * 2, rng)
        amplitude, scale = amplitude * 0.6, scale * 2
    if rng.random() < 0.4:
        total = np.abs(total)  # "turbulence": sharp creases like marble veins
    return _apply_palette(_normalise(total), _random_palette(rng, int(rng.integers(2, 5))))


def _stripe_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Stripes or a checkerboard at a random frequency and rotation."""
    theta = rng.uniform(0.0, np.pi)
    period = rng.uniform(4.0, max(5.0, min(h, w) / 3.0))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cos, sin = math.cos(theta), math.sin(theta)  # Python floats keep the arrays float32
    u = (cos * xx + sin * yy) * (2.0 * math.pi / period)
    if rng.random() < 0.5:
        v = (-sin * xx + cos * yy) * (2.0 * math.pi / period)
        values = (np.sin(u) * np.sin(v) > 0).astype(np.float32)
    else:
        # Sharpen a sine into near-square stripes; the amount decides how hard the edges are.
        values = 0.5 + 0.5 * np.tanh(rng.uniform(1.0, 8.0) * np.sin(u))
    return _apply_palette(values, _random_palette(rng, 2))


def _scratch_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Random thick line segments (scratches) and ellipses (blobs) on a mottled background."""
    palette = _random_palette(rng, 4)
    background = perlin_noise((h, w), (4, 4), rng) + 0.5 * perlin_noise((h, w), (16, 16), rng)
    out = _apply_palette(_normalise(background), palette[:2])
    size = min(h, w)
    for _ in range(int(rng.integers(10, 30))):
        colour = palette[int(rng.integers(0, len(palette)))]
        if rng.random() < 0.6:
            # A segment drawn as a thin rotated rectangle.
            r0, c0 = rng.uniform(0, h), rng.uniform(0, w)
            angle = rng.uniform(0.0, np.pi)
            length = rng.uniform(0.2, 0.8) * size
            half = max(0.5, rng.uniform(0.005, 0.03) * size)
            dr, dc = np.sin(angle), np.cos(angle)
            r1, c1 = r0 + length * dr, c0 + length * dc
            rows = np.array([r0 - half * dc, r1 - half * dc, r1 + half * dc, r0 + half * dc])
            cols = np.array([c0 + half * dr, c1 + half * dr, c1 - half * dr, c0 - half * dr])
            rr, cc = draw.polygon(rows, cols, shape=(h, w))
        else:
            radii = rng.uniform(0.02, 0.12, 2) * size + 1.0
            rr, cc = draw.ellipse(
                rng.uniform(0, h), rng.uniform(0, w), radii[0], radii[1],
                shape=(h, w), rotation=rng.uniform(-np.pi, np.pi),
            )
        out[rr, cc] = colour
    return out


def _cell_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Voronoi cells with one colour each and dark cell walls (cracked / cobble-like).

    Worley-style: one jittered seed per cell of a coarse grid, so each pixel only has to look at
    the seeds of its own and the 8 neighbouring grid cells.
    """
    gy, gx = (int(v) for v in rng.integers(3, 9, size=2))
    # Seeds in pixels, one per grid cell plus a ring of extra cells so border pixels have all
    # neighbours; padded cell (i, j) covers grid cell (i - 1, j - 1).
    jitter = rng.uniform(0.1, 0.9, (2, gy + 2, gx + 2))
    seed_y = ((np.arange(-1, gy + 1)[:, None] + jitter[0]) * (h / gy)).astype(np.float32)
    seed_x = ((np.arange(-1, gx + 1)[None, :] + jitter[1]) * (w / gx)).astype(np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    cy = (yy * (gy / h)).astype(np.intp) + 1
    cx = (xx * (gx / w)).astype(np.intp) + 1

    # Running nearest and second-nearest squared distance over the 3x3 neighbouring seeds.
    best = np.full((h, w), np.inf, dtype=np.float32)
    second = best.copy()
    cell = np.zeros((h, w), dtype=np.intp)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            sy, sx = cy + dy, cx + dx
            d = (yy - seed_y[sy, sx]) ** 2 + (xx - seed_x[sy, sx]) ** 2
            closer = d < best
            second = np.where(closer, best, np.minimum(second, d))
            cell = np.where(closer, sy * (gx + 2) + sx, cell)
            best = np.where(closer, d, best)

    colours = _random_palette(rng, (gy + 2) * (gx + 2))
    wall_width = rng.uniform(0.5, 3.0)
    wall = np.clip((np.sqrt(second) - np.sqrt(best)) / wall_width, 0.0, 1.0)
    return colours[cell] * wall[..., None]


_TEXTURE_FAMILIES = (_fractal_texture, _stripe_texture, _scratch_texture, _cell_texture)


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Convert an HxWx{1,3} image to ``channels`` (luminance for grey, replication for colour)."""
    if image.shape[2] == channels:
        return image
    if channels == 1:
        return (image @ _LUMA)[..., None]
    return np.repeat(image, 3, axis=2)


def procedural_texture(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """An HxWxC float32 texture in [0, 1] from a random family: fractal noise, stripes/checker,
    scratches/blobs or Voronoi cells."""
    h, w, c = (int(v) for v in shape)
    if c not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {c}")
    family = _TEXTURE_FAMILIES[int(rng.integers(0, len(_TEXTURE_FAMILIES)))]
    texture = family(h, w, rng)
    return np.clip(_to_channels(texture.astype(np.float32), c), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# The synthesizer
# --------------------------------------------------------------------------------------------


def parse_sources(text: str | None) -> tuple[str, ...]:
    """A command line's "self, smudge" -> ("self", "smudge"), None -> the default sources; the synthesizer
    checks the names."""
    if text is None:
        return SynthesisConfig().sources
    return tuple(name.strip() for name in text.split(",") if name.strip())


def parse_perlin_scales(text: str | None) -> dict[str, int]:
    """A command line's "0,3" -> {"min_scale_log2": 0, "max_scale_log2": 3} (Perlin lattice cells per axis
    from 2**0 to 2**3: fewer cells, larger regions); None -> {} (the defaults)."""
    if text is None:
        return {}
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--perlin-scales takes MIN,MAX (log2 of the lattice cells per axis, e.g. 0,3), got {text!r}")
    low, high = int(parts[0]), int(parts[1])
    if low > high:
        raise ValueError(f"--perlin-scales needs MIN <= MAX, got {text!r}")
    return {"min_scale_log2": low, "max_scale_log2": high}


def _validate(config: SynthesisConfig) -> None:
    if not 0.0 <= config.probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {config.probability}")
    if not 0 <= config.min_scale_log2 <= config.max_scale_log2:
        raise ValueError(
            "need 0 <= min_scale_log2 <= max_scale_log2, "
            f"got {config.min_scale_log2} and {config.max_scale_log2}"
        )
    low, high = config.opacity_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"opacity_range must satisfy 0 <= low <= high <= 1, got {config.opacity_range}")
    unknown = set(config.sources) - set(KNOWN_SOURCES)
    if unknown:
        raise ValueError(f"unknown anomaly sources {sorted(unknown)}; known: {KNOWN_SOURCES}")
    if config.foreground not in ("auto", "none"):
        raise ValueError(f"foreground must be 'auto' or 'none', got {config.foreground!r}")
    if config.regions not in ANOMALY_REGIONS:
        raise ValueError(f"regions must be one of {ANOMALY_REGIONS}, got {config.regions!r}")


class AnomalySynthesizer:
    """Turns good images into (image with synthetic anomaly, mask, has_anomaly) training triples.

    Picklable and stateless apart from the texture file list, so it can live in data-loader workers.
    """

    def __init__(self, config: SynthesisConfig | None = None) -> None:
        self.config = config if config is not None else SynthesisConfig()
        _validate(self.config)

        self.texture_files: list[Path] = []
        if self.config.texture_dir is not None:
            folder = Path(self.config.texture_dir)
            if not folder.is_dir():
                raise FileNotFoundError(f"texture_dir {folder} is not a folder")
            self.texture_files = sorted(
                p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXTURE_SUFFIXES
            )
            if not self.texture_files:
                raise ValueError(
                    f"texture_dir {folder} contains no images ({', '.join(sorted(TEXTURE_SUFFIXES))})"
                )

        sources = list(dict.fromkeys(self.config.sources))
        if self.texture_files and "texture" not in sources:
            sources.append("texture")
        if "texture" in sources and not self.texture_files:
            raise ValueError("source 'texture' needs config.texture_dir")
        if not sources:
            raise ValueError("config.sources is empty")
        self.sources: tuple[str, ...] = tuple(sources)

    def __call__(
        self,
        image: np.ndarray,
        rng: np.random.Generator,
        foreground: np.ndarray | None = None,
        force: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Return (augmented float32 HxWxC in [0, 1], mask float32 HxW in {0, 1}, has_anomaly).

        An anomaly is made with probability ``config.probability``, always for ``force=True`` and
        never for ``force=False``. It is confined to ``foreground`` (given, estimated, or the whole
        image depending on ``config.foreground``); if no large enough region is found after a few
        tries the image comes back unchanged with ``has_anomaly=False``.
        """
        image = _as_hwc(image)
        h, w = image.shape[:2]
        unchanged = (image.copy(), np.zeros((h, w), dtype=np.float32), False)

        make = rng.random() < self.config.probability if force is None else bool(force)
        if not make:
            return unchanged

        region = self._foreground(image, foreground)
        name = self.sources[int(rng.integers(0, len(self.sources)))]
        mask_config = self.config
        if name in _SOFT_SOURCES:
            # A stain is a blob: fine-scale speckle would fade to nothing visible and teach false alarms.
            coarsest = min(self.config.max_scale_log2, _COARSEST_SCALE_LOG2[name])
            mask_config = replace(self.config, max_scale_log2=max(coarsest, self.config.min_scale_log2))
        needed = max(1.0, self.config.min_mask_fraction * float(region.sum()))
        for _ in range(_MASK_ATTEMPTS):
            mask = perlin_mask((h, w), rng, mask_config) & region
            if self.config.regions == "one":
                mask = one_region(mask, needed, rng)
            if mask.sum() >= needed:
                break
        else:
            return unchanged

        source = self._source(name, image, rng)
        if name in _SOFT_SOURCES:
            beta = rng.uniform(*_SOFT_OPACITY) * _feathered(mask, rng)[..., None]
        else:
            beta = rng.uniform(*self.config.opacity_range)
        blended = (1.0 - beta) * image + beta * source
        # np.where keeps pixels outside the mask bit-identical to the input.
        augmented = np.where(mask[..., None], np.clip(blended, 0.0, 1.0), image).astype(np.float32)
        return augmented, mask.astype(np.float32), True

    def _foreground(self, image: np.ndarray, foreground: np.ndarray | None) -> np.ndarray:
        h, w = image.shape[:2]
        if foreground is not None:
            foreground = np.asarray(foreground).astype(bool)
            if foreground.shape != (h, w):
                raise ValueError(f"foreground shape {foreground.shape} does not match image {(h, w)}")
            return foreground
        if self.config.foreground == "auto":
            return estimate_foreground(image)
        return np.ones((h, w), dtype=bool)

    def _source(self, name: str, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if name == "self":
            return self_augmentation_source(image, rng)
        if name == "smudge":
            return smudge_source(image, rng)
        if name == "blur":
            return blur_source(image, rng)
        if name == "shade":
            return shade_source(image, rng)
        if name == "restyle":
            if rng.random() < 0.5:
                return restyle_source(image, self_augmentation_source(image, rng), rng)
            return restyle_source(image, procedural_texture(image.shape, rng), rng)
        if name == "procedural":
            return procedural_texture(image.shape, rng)
        return self._texture(image.shape, rng)

    def _texture(self, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
        """A random texture file, resized to the image, randomly flipped, with matching channels."""
        h, w, c = shape
        path = self.texture_files[int(rng.integers(0, len(self.texture_files)))]
        with Image.open(path) as loaded:
            rgb = loaded.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
        texture = np.asarray(rgb, dtype=np.float32) / 255.0
        if rng.random() < 0.5:
            texture = texture[:, ::-1]
        if rng.random() < 0.5:
            texture = texture[::-1]
        return np.ascontiguousarray(_to_channels(texture, c))

"""Tests for the synthetic anomaly generator (diffad.training.synthesis)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from diffad.training.synthesis import (
    AnomalySynthesizer,
    SynthesisConfig,
    blur_source,
    estimate_foreground,
    one_region,
    perlin_mask,
    perlin_noise,
    procedural_texture,
    restyle_source,
    self_augmentation_source,
    shade_source,
    smudge_source,
)
from PIL import Image
from scipy import ndimage

SIZE = 64


def disc_image(channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc (slightly textured) on a dark, slightly noisy background, and the true disc."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    disc = (yy - 30) ** 2 + (xx - 34) ** 2 < 20**2
    colour = np.array([0.8, 0.6, 0.3][:channels] if channels == 3 else [0.7], dtype=np.float32)
    shading = 0.9 + 0.1 * np.sin(xx / 3.0)[..., None]
    image = np.where(disc[..., None], colour * shading, 0.08)
    image = image + np.random.default_rng(seed).normal(0.0, 0.01, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), disc


def noise_image(channels: int = 3, seed: int = 0, shape: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    return np.random.default_rng(seed).random((*shape, channels)).astype(np.float32)


def stripes_image(channels: int = 1) -> np.ndarray:
    xx = np.mgrid[0:SIZE, 0:SIZE][1]
    values = 0.2 + 0.6 * ((xx // 4) % 2)
    return np.repeat(values[..., None], channels, axis=2).astype(np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# --- Perlin noise and masks -----------------------------------------------------------------


def test_perlin_noise_non_divisible_shape() -> None:
    noise = perlin_noise((48, 80), (3, 7), np.random.default_rng(0))
    assert noise.shape == (48, 80)
    assert noise.dtype == np.float32
    assert np.all(np.isfinite(noise))
    assert np.abs(noise).max() <= 1.0 + 1e-5
    assert noise.std() > 0.1  # not flat


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (100, 37)])
def test_perlin_mask_shape_dtype_and_nonempty(shape: tuple[int, int]) -> None:
    masks = [perlin_mask(shape, np.random.default_rng(seed), SynthesisConfig()) for seed in range(30)]
    assert all(m.shape == shape and m.dtype == bool for m in masks)
    nonempty = sum(bool(m.any()) for m in masks)
    assert nonempty >= 24  # a rare single-cell draw may stay below the threshold; retries cover it
    assert np.mean([m.mean() for m in masks]) < 0.3  # defects, not the whole image


def test_perlin_mask_scale_comes_from_config() -> None:
    def mean_blob_count(log2: int) -> float:
        config = SynthesisConfig(min_scale_log2=log2, max_scale_log2=log2)
        masks = [perlin_mask((SIZE, SIZE), np.random.default_rng(s), config) for s in range(10)]
        return float(np.mean([ndimage.label(m)[1] for m in masks]))

    assert mean_blob_count(4) > 3 * max(mean_blob_count(0), 1.0)


# --- Foreground -----------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_estimate_foreground_finds_disc(channels: int) -> None:
    image, disc = disc_image(channels)
    foreground = estimate_foreground(image)
    assert foreground.shape == disc.shape and foreground.dtype == bool
    assert iou(foreground, disc) > 0.8


def test_estimate_foreground_large_image_is_subsampled_consistently() -> None:
    image, disc = disc_image(3)
    big = np.repeat(np.repeat(image, 4, axis=0), 4, axis=1)  # 256 x 256
    big_disc = np.repeat(np.repeat(disc, 4, axis=0), 4, axis=1)
    assert iou(estimate_foreground(big), big_disc) > 0.8


@pytest.mark.parametrize(
    "image",
    [
        noise_image(3),
        noise_image(1, seed=1),
        stripes_image(1),
        stripes_image(3),
        np.full((SIZE, SIZE, 3), 0.5),
    ],
    ids=["noise-rgb", "noise-gray", "stripes-gray", "stripes-rgb", "flat"],
)
def test_estimate_foreground_texture_is_everything(image: np.ndarray) -> None:
    foreground = estimate_foreground(image.astype(np.float32))
    assert foreground.shape == image.shape[:2]
    assert foreground.all()


def test_estimate_foreground_tiny_object_is_everything() -> None:
    image = np.full((SIZE, SIZE, 1), 0.1, dtype=np.float32)
    image[30:33, 30:33] = 0.9  # ~0.2 % of the image: not a trustworthy object
    assert estimate_foreground(image).all()


def test_rejects_bad_image_shape() -> None:
    with pytest.raises(ValueError, match="HxWxC"):
        estimate_foreground(np.zeros((SIZE, SIZE), dtype=np.float32))
    with pytest.raises(ValueError, match="HxWxC"):
        AnomalySynthesizer()(np.zeros((SIZE, SIZE, 4), dtype=np.float32), np.random.default_rng(0))


# --- The synthesizer ------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_forced_anomaly_stays_inside_disc(channels: int) -> None:
    image, disc = disc_image(channels)
    allowed = ndimage.binary_dilation(disc)  # one pixel of slack for the estimated outline
    synth = AnomalySynthesizer(SynthesisConfig(foreground="auto"))
    made = 0
    for seed in range(30):
        _, mask, has_anomaly = synth(image, np.random.default_rng(seed), force=True)
        assert has_anomaly == bool(mask.any())
        assert not np.any(mask.astype(bool) & ~allowed)
        made += has_anomaly
    assert made >= 27


def test_forced_anomaly_stays_inside_given_foreground() -> None:
    image = noise_image(3)
    foreground = np.zeros((SIZE, SIZE), dtype=bool)
    foreground[8:40, 20:60] = True
    synth = AnomalySynthesizer(SynthesisConfig(foreground="none"))
    made = 0
    for seed in range(30):
        _, mask, has_anomaly = synth(image, np.random.default_rng(seed), foreground=foreground, force=True)
        assert not np.any(mask.astype(bool) & ~foreground)
        made += has_anomaly
    assert made >= 27


def test_empty_foreground_gives_no_anomaly() -> None:
    image = noise_image(3)
    out, mask, has_anomaly = AnomalySynthesizer()(
        image, np.random.default_rng(0), foreground=np.zeros((SIZE, SIZE), dtype=bool), force=True
    )
    assert not has_anomaly
    assert not mask.any()
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("source", ["self", "smudge", "blur", "restyle", "procedural"])
def test_changes_only_inside_mask(channels: int, source: str) -> None:
    image, _ = disc_image(channels)
    synth = AnomalySynthesizer(SynthesisConfig(sources=(source,)))
    for seed in range(5):
        out, mask, has_anomaly = synth(image, np.random.default_rng(seed), force=True)
        assert has_anomaly
        assert out.shape == image.shape and out.dtype == np.float32
        assert mask.shape == image.shape[:2] and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert out.min() >= 0.0 and out.max() <= 1.0
        inside = mask.astype(bool)
        np.testing.assert_array_equal(out[~inside], image[~inside])
        assert np.abs(out[inside] - image[inside]).max() > 0.01


def test_reproducible_for_a_seed() -> None:
    image, _ = disc_image(3)
    synth = AnomalySynthesizer(SynthesisConfig(probability=1.0))
    out_a, mask_a, _ = synth(image, np.random.default_rng(123))
    out_b, mask_b, _ = synth(image, np.random.default_rng(123))
    out_c, mask_c, _ = synth(image, np.random.default_rng(124))
    np.testing.assert_array_equal(out_a, out_b)
    np.testing.assert_array_equal(mask_a, mask_b)
    assert not np.array_equal(mask_a, mask_c) or not np.array_equal(out_a, out_c)


def test_picklable_for_loader_workers(texture_dir) -> None:
    synth = AnomalySynthesizer(SynthesisConfig(probability=1.0, texture_dir=str(texture_dir)))
    copy = pickle.loads(pickle.dumps(synth))
    image, _ = disc_image(3)
    for seed in range(3):
        expected = synth(image, np.random.default_rng(seed))
        actual = copy(image, np.random.default_rng(seed))
        np.testing.assert_array_equal(expected[0], actual[0])
        np.testing.assert_array_equal(expected[1], actual[1])


def test_probability_and_force() -> None:
    image = noise_image(1, shape=(32, 32))
    synth = AnomalySynthesizer(SynthesisConfig(probability=0.5, foreground="none", sources=("self",)))
    rng = np.random.default_rng(7)
    results = [synth(image, rng)[2] for _ in range(200)]
    assert 0.35 <= np.mean(results) <= 0.65

    always = AnomalySynthesizer(SynthesisConfig(probability=1.0, foreground="none", sources=("self",)))
    for _ in range(20):
        out, mask, has_anomaly = always(image, rng, force=False)
        assert not has_anomaly and not mask.any()
        np.testing.assert_array_equal(out, image)

    rarely = AnomalySynthesizer(SynthesisConfig(probability=0.0, foreground="none", sources=("self",)))
    assert all(rarely(image, rng, force=True)[2] for _ in range(20))
    assert not any(rarely(image, rng)[2] for _ in range(20))


def test_opacity_blend_relation() -> None:
    # A procedural source and whole-image foreground make every random draw independent of the
    # image content, so the same seed gives the same mask, beta and source for any image. With
    # out = (1 - m) * image + m * ((1 - beta) * image + beta * source):
    #   out(ones) - out(zeros) = 1 - beta inside the mask, and out(zeros) = beta * source.
    config = SynthesisConfig(opacity_range=(0.5, 0.5000001), sources=("procedural",), foreground="none")
    synth = AnomalySynthesizer(config)
    zeros = np.zeros((SIZE, SIZE, 3), dtype=np.float32)
    ones = np.ones((SIZE, SIZE, 3), dtype=np.float32)
    for seed in range(5):
        out_zeros, mask_zeros, _ = synth(zeros, np.random.default_rng(seed), force=True)
        out_ones, mask_ones, _ = synth(ones, np.random.default_rng(seed), force=True)
        np.testing.assert_array_equal(mask_zeros, mask_ones)
        inside = mask_zeros.astype(bool)
        assert inside.any()
        np.testing.assert_allclose(out_ones[inside] - out_zeros[inside], 0.5, atol=1e-5)
        source = out_zeros[inside] / 0.5
        assert source.min() >= 0.0 and source.max() <= 1.0 + 1e-5
        assert source.std() > 0.05  # a real texture went in, not a constant

    # The default range: beta recovered from the same relation lies in [0.1, 0.8) and varies.
    synth = AnomalySynthesizer(SynthesisConfig(sources=("procedural",), foreground="none"))
    betas = []
    for seed in range(10):
        out_zeros, mask, _ = synth(zeros, np.random.default_rng(seed), force=True)
        out_ones, _, _ = synth(ones, np.random.default_rng(seed), force=True)
        diff = (out_ones - out_zeros)[mask.astype(bool)]
        np.testing.assert_allclose(diff, diff.flat[0], atol=1e-5)  # one beta per sample
        betas.append(1.0 - float(diff.flat[0]))
    assert 0.1 - 1e-5 <= min(betas) and max(betas) < 0.8 + 1e-5
    assert np.std(betas) > 0.02


# --- Sources --------------------------------------------------------------------------------


@pytest.fixture
def texture_dir(tmp_path):
    folder = tmp_path / "textures"
    (folder / "nested").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 50, 50)).save(folder / "red.png")
    Image.new("L", (20, 20), 100).save(folder / "nested" / "grey.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.parametrize("channels", [1, 3])
def test_texture_source_is_used(texture_dir, channels: int) -> None:
    # Full opacity: the masked pixels are exactly the (constant) texture colours, channel-matched.
    config = SynthesisConfig(
        sources=(), texture_dir=str(texture_dir), foreground="none", opacity_range=(1.0, 1.0)
    )
    synth = AnomalySynthesizer(config)
    assert synth.sources == ("texture",)
    assert len(synth.texture_files) == 2
    red, grey = np.array([200, 50, 50]) / 255.0, np.array([100, 100, 100]) / 255.0
    if channels == 1:  # grey images get the texture's luminance
        red, grey = np.array([red @ [0.299, 0.587, 0.114]]), grey[:1]
    image = np.zeros((48, 80, channels), dtype=np.float32)
    seen = set()
    for seed in range(12):
        out, mask, has_anomaly = synth(image, np.random.default_rng(seed), force=True)
        assert has_anomaly
        values = out[mask.astype(bool)]
        matches = [name for name, c in (("red", red), ("grey", grey)) if np.allclose(values, c, atol=1e-3)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {"red", "grey"}


def test_smudge_fades_the_texture_and_has_no_sharp_edge() -> None:
    # A stain on a fine texture: the source has lost the texture's fine detail.
    xx = np.mgrid[0:SIZE, 0:SIZE][1]
    texture = (0.5 + 0.25 * np.sin(xx * 2.0))[..., None].astype(np.float32)
    source = smudge_source(texture, np.random.default_rng(0))
    assert source.shape == texture.shape and source.dtype == np.float32
    assert np.abs(np.diff(source[..., 0], axis=1)).mean() < 0.5 * np.abs(np.diff(texture[..., 0], axis=1)).mean()

    # On a flat grey image the change is proportional to the opacity, which fades towards the border.
    flat = np.full((SIZE, SIZE, 1), 0.5, dtype=np.float32)
    synth = AnomalySynthesizer(SynthesisConfig(sources=("smudge",), foreground="none"))
    checked = 0
    for seed in range(30):
        out, mask, has_anomaly = synth(flat, np.random.default_rng(seed), force=True)
        assert has_anomaly
        inside = mask.astype(bool)
        np.testing.assert_array_equal(out[~inside], flat[~inside])
        deep = ndimage.binary_erosion(inside, iterations=4)
        if deep.sum() < 20:
            continue
        change = np.abs(out - flat)[..., 0]
        border = inside & ~ndimage.binary_erosion(inside)
        assert change[border].mean() < 0.8 * change[deep].mean()
        checked += 1
    assert checked >= 3


def test_smudge_masks_are_blobs_not_speckle() -> None:
    # A smudge draws its mask at coarse Perlin scales only: few, large connected regions.
    image = noise_image(1, shape=(128, 128))
    synth = AnomalySynthesizer(SynthesisConfig(sources=("smudge",), foreground="none"))
    counts = []
    for seed in range(20):
        _, mask, _ = synth(image, np.random.default_rng(seed), force=True)
        counts.append(ndimage.label(mask)[1])
    assert max(counts) <= 40


def test_one_region_keeps_a_single_connected_region_big_enough() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[1:3, 1:3] = True      # 4 pixels
    mask[10:15, 10:15] = True  # 25 pixels
    mask[15, 15] = True        # touches the square diagonally: the same region (8 neighbours)
    mask[0, 19] = True         # 1 pixel
    kept = {int(one_region(mask, 4, np.random.default_rng(seed)).sum()) for seed in range(20)}
    assert kept == {4, 26}     # either region of 4 or more pixels, whole, never the single pixel
    assert one_region(mask, 30, np.random.default_rng(0)).sum() == 0


def test_one_region_anomalies_are_single_small_defects() -> None:
    # --anomaly-regions one: each anomaly is one connected region, much smaller than the default's scatter.
    image = noise_image(1, shape=(128, 128))
    one = AnomalySynthesizer(SynthesisConfig(regions="one", foreground="none"))
    every = AnomalySynthesizer(SynthesisConfig(foreground="none"))
    areas, default_areas = [], []
    for seed in range(20):
        out, mask, made = one(image, np.random.default_rng(seed), force=True)
        assert made and ndimage.label(mask, structure=np.ones((3, 3)))[1] == 1
        assert np.array_equal(out[mask == 0], image[mask == 0])
        areas.append(mask.mean())
        default_areas.append(every(image, np.random.default_rng(seed), force=True)[1].mean())
    assert np.median(areas) < 0.5 * np.median(default_areas)


def test_texture_dir_adds_texture_source(texture_dir) -> None:
    synth = AnomalySynthesizer(SynthesisConfig(texture_dir=str(texture_dir)))
    assert set(synth.sources) == {*SynthesisConfig().sources, "texture"}


def test_empty_texture_dir_is_an_error(tmp_path) -> None:
    empty = tmp_path / "no_textures_here"
    empty.mkdir()
    with pytest.raises(ValueError, match="no_textures_here"):
        AnomalySynthesizer(SynthesisConfig(texture_dir=str(empty)))
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        AnomalySynthesizer(SynthesisConfig(texture_dir=str(tmp_path / "missing_folder")))


@pytest.mark.parametrize(
    "config, message",
    [
        (SynthesisConfig(sources=("texture",)), "source 'texture' needs config.texture_dir"),
        (SynthesisConfig(sources=("dtd",)), r"unknown anomaly sources \['dtd'\]"),
        (SynthesisConfig(sources=()), "config.sources is empty"),
        (SynthesisConfig(foreground="object"), "foreground must be 'auto' or 'none', got 'object'"),
        (SynthesisConfig(probability=1.5), r"probability must be in \[0, 1\], got 1.5"),
        (SynthesisConfig(opacity_range=(0.8, 0.2)), "opacity_range must satisfy"),
        (SynthesisConfig(regions="some"), r"regions must be one of \('all', 'one'\), got 'some'"),
    ],
)
def test_invalid_config_is_rejected(config: SynthesisConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AnomalySynthesizer(config)


@pytest.mark.parametrize("channels", [1, 3])
def test_self_augmentation_source(channels: int) -> None:
    image, _ = disc_image(channels)
    for seed in range(10):
        source = self_augmentation_source(image, np.random.default_rng(seed))
        assert source.shape == image.shape and source.dtype == np.float32
        assert source.min() >= 0.0 and source.max() <= 1.0
        assert np.abs(source - image).mean() > 0.01


def test_self_augmentation_moves_whole_strips() -> None:
    # In a vertically uniform image all rows are equal. Every photometric change is per pixel or
    # (blur, contrast) keeps vertical uniformity, and strips are whole rows or whole columns, so
    # the rows must stay equal: anything else means the strips were cut or moved wrongly.
    xx = np.mgrid[0:SIZE, 0:SIZE][1]
    image = np.repeat((xx / SIZE)[..., None], 3, axis=2).astype(np.float32)
    for seed in range(10):
        source = self_augmentation_source(image, np.random.default_rng(seed))
        np.testing.assert_allclose(source, np.broadcast_to(source[:1], source.shape), atol=1e-5)
        assert np.abs(source - image).mean() > 0.01


@pytest.mark.parametrize("channels", [1, 3])
def test_procedural_texture_is_not_smooth(channels: int) -> None:
    # Smooth images (ramps, gentle blobs) have a mean |Laplacian| around 0.005 at this size;
    # every texture family has edges or fine detail well above it.
    for seed in range(24):
        texture = procedural_texture((48, 80, channels), np.random.default_rng(seed))
        assert texture.shape == (48, 80, channels) and texture.dtype == np.float32
        assert texture.min() >= 0.0 and texture.max() <= 1.0
        grey = texture.mean(axis=2)
        assert grey.std() > 0.04
        assert np.abs(ndimage.laplace(grey, mode="nearest")).mean() > 0.015


def _texture(size: int = 64, seed: int = 0) -> np.ndarray:
    """A fine grey texture around 0.5: what DAGM-like surfaces look like."""
    rng = np.random.default_rng(seed)
    return np.clip(0.5 + 0.1 * rng.standard_normal((size, size, 1)), 0, 1).astype(np.float32)


def _local_energy(image: np.ndarray) -> float:
    return float(np.abs(image[..., 0] - ndimage.gaussian_filter(image[..., 0], 2.0)).mean())


def test_blur_keeps_brightness_and_removes_texture() -> None:
    texture = _texture()
    for seed in range(5):
        source = blur_source(texture, np.random.default_rng(seed))
        assert abs(float(source.mean() - texture.mean())) < 0.01  # brightness kept
        assert _local_energy(source) < 0.7 * _local_energy(texture)  # texture energy down, as real defects
    synth = AnomalySynthesizer(SynthesisConfig(sources=("blur",), foreground="none"))
    out, mask, made = synth(texture, np.random.default_rng(3), force=True)
    inside = mask.astype(bool)
    assert made and inside.any()
    np.testing.assert_array_equal(out[~inside], texture[~inside])
    assert abs(float(out[inside].mean() - texture[inside].mean())) < 0.02


def test_restyle_takes_the_images_mean_and_contrast() -> None:
    texture = _texture()
    foreign = np.random.default_rng(1).random((64, 64, 1)).astype(np.float32) * 0.2 + 0.7  # bright, flat-ish
    for seed in range(5):
        rng = np.random.default_rng(seed)
        out = restyle_source(texture, foreign, rng)
        factor = np.random.default_rng(seed).uniform(0.5, 2.0)
        assert float(out.mean()) == pytest.approx(float(texture.mean()), abs=0.01)
        assert float(out.std()) == pytest.approx(float(texture.std()) * factor, rel=0.05)
        # the pattern is the foreign one, not the image's
        assert np.corrcoef(out.ravel(), foreign.ravel())[0, 1] > 0.95
    synth = AnomalySynthesizer(SynthesisConfig(sources=("restyle",), foreground="none"))
    out, mask, made = synth(texture, np.random.default_rng(0), force=True)
    assert made and not np.array_equal(out, texture)


def test_shade_shifts_brightness_and_keeps_the_texture() -> None:
    texture = _texture()
    shifts = []
    for seed in range(8):
        source = shade_source(texture, np.random.default_rng(seed))
        shift = float(source.mean() - texture.mean())
        # half to twice the image's spread (0.1), either way: visible as a shade, not as a new pattern
        assert 0.04 <= abs(shift) <= 0.21
        shifts.append(shift)
        fine = texture - ndimage.gaussian_filter(texture, (2.0, 2.0, 0))
        assert np.corrcoef((source - ndimage.gaussian_filter(source, (2.0, 2.0, 0))).ravel(), fine.ravel())[0, 1] > 0.9
    assert min(shifts) < 0 < max(shifts)  # darker and lighter both occur
    synth = AnomalySynthesizer(SynthesisConfig(sources=("shade",), foreground="none"))
    out, mask, made = synth(texture, np.random.default_rng(2), force=True)
    inside = mask.astype(bool)
    assert made and inside.mean() > 0.02
    np.testing.assert_array_equal(out[~inside], texture[~inside])

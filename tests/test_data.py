"""Finding and reading the user's images: layouts, formats, and clear errors naming the file."""

import numpy as np
import pytest
from diffad.training.data import (
    DataError,
    detect_channels,
    find_test_samples,
    find_train_images,
    find_validation_images,
    read_image,
    read_mask,
)
from diffad.training.demo_data import make_category
from PIL import Image


@pytest.fixture
def category(tmp_path):
    return make_category(tmp_path / "cat", size=40, num_train=5, num_test_good=2, num_test_defect=1,
                         num_validation=2)


def test_mvtec_layout(category):
    assert len(find_train_images(category)) == 5
    assert len(find_validation_images(category)) == 2
    samples = find_test_samples(category)
    assert len(samples) == 2 + 3
    defects = [s for s in samples if s.label == 1]
    assert {s.defect_type for s in defects} == {"scratch", "spot", "patch"}
    assert all(s.mask_path.is_file() for s in defects)
    assert all(s.mask_path is None for s in samples if s.label == 0)


def test_plain_folder(tmp_path):
    for i in range(3):
        Image.new("RGB", (20, 30), (i, i, i)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in find_train_images(tmp_path)] == ["0.jpg", "1.jpg", "2.jpg"]
    assert find_validation_images(tmp_path) == []


def test_empty_and_missing_folders_name_the_folder(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        find_train_images(tmp_path)
    with pytest.raises(DataError, match="not found"):
        find_train_images(tmp_path / "nope")
    with pytest.raises(DataError, match="no test folder"):
        find_test_samples(tmp_path)


def test_missing_mask_names_the_image(category):
    (category / "ground_truth" / "spot" / "000_mask.png").unlink()
    with pytest.raises(DataError, match=r"missing mask for .*spot.000\.png"):
        find_test_samples(category)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(DataError, match="broken.png"):
        read_image(bad, 32, 3)
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(DataError, match="truncated.png"):
        read_image(truncated, 32, 3)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
@pytest.mark.parametrize("channels", [1, 3])
def test_any_mode_and_size(tmp_path, mode, channels):
    path = tmp_path / f"im_{mode.replace(';', '')}.png"
    if mode == "I;16":
        Image.fromarray(np.full((30, 50), 65535, dtype=np.uint16)).save(path)
    else:
        Image.new("RGB", (50, 30), (255, 255, 255)).convert(mode).save(path)
    image = read_image(path, 32, channels)
    assert image.shape == (32, 32, channels) and image.dtype == np.float32
    assert image.min() >= 0 and image.max() <= 1
    assert image.mean() == pytest.approx(1.0, abs=0.01)  # white stays white, 16-bit included


def test_transparent_pixels_become_black(tmp_path):
    im = Image.new("RGBA", (10, 10), (255, 255, 255, 255))
    im.putpixel((0, 0), (255, 255, 255, 0))
    im.save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png", 10, 3)
    assert image[0, 0].max() == 0 and image[5, 5].min() == 1


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("L", (40, 20), 0)
    im.paste(255, (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the displayed image is 20 wide, 40 tall
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    image = read_image(tmp_path / "r.jpg", 40, 1)[:, :, 0]
    assert image[:20].mean() > 0.9 and image[20:].mean() < 0.1  # white on top after rotation


def test_masks_are_binary_at_the_requested_size(tmp_path):
    mask = np.zeros((20, 20), np.uint8)
    mask[:10] = 1  # any value > 0 is a defect, not only 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png", 8)
    assert out.shape == (8, 8) and set(np.unique(out)) == {0.0, 1.0}
    assert out[:4].all() and not out[4:].any()


def test_detect_channels(tmp_path):
    Image.new("L", (8, 8), 100).save(tmp_path / "g.png")
    Image.new("RGB", (8, 8), (100, 100, 100)).save(tmp_path / "grey_rgb.png")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "red.png")
    assert detect_channels([tmp_path / "g.png", tmp_path / "grey_rgb.png"]) == 1
    assert detect_channels([tmp_path / "g.png", tmp_path / "red.png"]) == 3

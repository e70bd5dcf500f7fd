"""Metrics against values worked out by hand on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
from diffad.evaluation.metrics import (
    aupro,
    compute_metrics,
    f1_max,
    image_auroc,
    per_defect_type,
    pixel_ap,
    pixel_auroc,
    threshold_from_f1,
    threshold_from_quantile,
)

# --------------------------------------------------------------------------- image_auroc


def test_image_auroc_hand_example() -> None:
    # Anomalous 0.35 beats good 0.1 but not 0.4; anomalous 0.8 beats both: 3 of 4 pairs -> 0.75.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_image_auroc_perfect_and_reversed() -> None:
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0


def test_image_auroc_single_class_raises() -> None:
    with pytest.raises(ValueError, match="both good and anomalous"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1, 1], [0.1, 0.2], "differ in length"),
        ([0, 2, 1], [0.1, 0.2, 0.3], "only 0"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "NaN"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_image_inputs_validated(labels: list, scores: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        image_auroc(labels, scores)


# --------------------------------------------------------------------------- pixel_auroc / pixel_ap


def test_pixel_auroc_hand_example() -> None:
    masks = np.array([[[1, 0], [0, 0]], [[0, 1], [0, 0]]])
    maps = np.array([[[0.8, 0.9], [0.1, 0.2]], [[0.3, 0.5], [0.5, 0.0]]])
    # Positives 0.8 and 0.5; negatives 0.9, 0.1, 0.2, 0.3, 0.5, 0.0 (12 pairs).
    # 0.8 beats 5 negatives (all but 0.9); 0.5 beats 4 and ties 1 (counts 0.5) -> (5 + 4.5) / 12.
    assert pixel_auroc(masks, maps) == pytest.approx(9.5 / 12)


def test_pixel_ap_hand_example() -> None:
    masks = np.array([[[1, 0, 1, 0, 0]]])
    maps = np.array([[[0.9, 0.8, 0.7, 0.2, 0.6]]])
    # Ranked: 0.9 P, 0.8 N, 0.7 P, ... Recall steps 0 -> 0.5 at precision 1/1, 0.5 -> 1 at precision 2/3.
    # AP = 0.5 * 1 + 0.5 * 2/3 = 5/6.
    assert pixel_ap(masks, maps) == pytest.approx(5 / 6)


def test_pixel_metrics_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"\(1, 2, 2\).*\(1, 2, 3\)"):
        pixel_auroc(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)))


# --------------------------------------------------------------------------- f1_max


def test_f1_max_hand_example() -> None:
    labels = [0, 1, 1, 0, 1]
    scores = [0.2, 0.9, 0.4, 0.5, 0.7]
    # Flag score >= t:  t=0.9: TP1 FP0 FN2 -> F1 0.5;   t=0.7: TP2 FP0 FN1 -> F1 0.8;
    # t=0.5: TP2 FP1 FN1 -> 2/3;   t=0.4: TP3 FP1 FN0 -> P 3/4, R 1, F1 6/7;   t=0.2: TP3 FP2 -> 0.75.
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(6 / 7)
    assert threshold == pytest.approx(0.4)
    assert threshold_from_f1(labels, scores) == pytest.approx(0.4)


def test_f1_max_needs_an_anomaly() -> None:
    with pytest.raises(ValueError, match="anomalous"):
        f1_max([0, 0], [0.1, 0.2])


# --------------------------------------------------------------------------- aupro


def _two_region_example() -> tuple[np.ndarray, np.ndarray]:
    """One 1x16 image: region A (2 px), region B (4 px), 10 normal pixels."""
    mask = np.array([1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    amap = np.zeros(16)
    amap[[0, 1]] = 1.0  # A: above every normal pixel
    amap[[3, 4]] = 0.7  # half of B: above all normals but one
    amap[[5, 6]] = 0.5  # other half of B: above all normals but two
    amap[7], amap[8] = 0.8, 0.6  # two "hot" normal pixels, the other 8 stay at 0
    return mask[None, None, :], amap[None, None, :]


def test_aupro_hand_example() -> None:
    masks, maps = _two_region_example()
    # Curve (FPR, PRO) as the threshold drops; FPR step = 1/10, PRO = mean of A and B overlap:
    #   t in (0.8, 1]:  FPR 0,   A 1, B 0   -> PRO 0.5
    #   t in (0.7, 0.8]: FPR 0.1, PRO 0.5
    #   t in (0.6, 0.7]: FPR 0.1, B 1/2     -> PRO 0.75
    #   t in (0.5, 0.6]: FPR 0.2, PRO 0.75
    #   t in (0, 0.5]:  FPR 0.2, B 1        -> PRO 1;  t <= 0: FPR 1, PRO 1
    # Area to 0.3 = 0.1*0.5 + 0.1*0.75 + 0.1*1 = 0.225; / 0.3 = 0.75.
    assert aupro(masks, maps) == pytest.approx(0.75, abs=1e-6)
    # Limit 0.15 cuts inside the PRO-0.75 step: (0.05 + 0.05*0.75) / 0.15 = 0.58333.
    assert aupro(masks, maps, fpr_limit=0.15) == pytest.approx(0.0875 / 0.15, abs=1e-6)
    # Few thresholds only lose detail between the curve points: still within the 1e-2 budget.
    assert aupro(masks, maps, num_thresholds=4) == pytest.approx(0.75, abs=1e-2)


def test_aupro_uses_8_connectivity() -> None:
    # 3x3 image; (0,1) and (1,2) touch diagonally, so {(0,0), (0,1), (1,2)} is ONE region of 3 px
    # (with 4-connectivity it would be two regions, {(0,0), (0,1)} and {(1,2)}).
    mask = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]])
    amap = np.array([[0.5, 0.5, 0.75], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    # 6 normal pixels, one hot (0.75).   t in (0.75, 1]: FPR 0, PRO 1/3 (only (1,2) flagged).
    # t in (0.5, 0.75]: FPR 1/6, PRO 1/3.   t in (0, 0.5]: FPR 1/6, PRO 1.   t <= 0: FPR 1, PRO 1.
    # Area to 0.3 = 1/6 * 1/3 + (0.3 - 1/6) * 1 = 0.188889; / 0.3 = 0.629630.
    # (4-connectivity: PRO 1/2 on the first step -> 0.722222.)
    expected = (1 / 18 + (0.3 - 1 / 6)) / 0.3
    assert aupro(mask[None], amap[None]) == pytest.approx(expected, abs=1e-6)


def test_aupro_constant_map_is_diagonal() -> None:
    masks, _ = _two_region_example()
    # A constant map flags nothing or everything: curve (0,0) -> (1,1), area to 0.3 = 0.045 -> 0.15.
    assert aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.15, abs=1e-6)


def test_aupro_binarises_255_masks() -> None:
    masks, maps = _two_region_example()
    assert aupro(masks * 255, maps) == aupro(masks, maps)


def test_aupro_stack_perfect_and_random() -> None:
    # 50 maps of 128x128 with one or two rectangles each: also keeps the vectorised path honest on speed.
    rng = np.random.default_rng(0)
    masks = np.zeros((50, 128, 128), dtype=np.uint8)
    for mask in masks[:40]:  # the last 10 images are fully normal
        for _ in range(rng.integers(1, 3)):
            r, c = rng.integers(0, 100, size=2)
            h, w = rng.integers(2, 28, size=2)
            mask[r : r + h, c : c + w] = 255
    noise = rng.random(masks.shape).astype(np.float32)
    perfect = (masks > 0) + 0.5 * noise  # anomalous in [1, 1.5), normal in [0, 0.5)
    assert aupro(masks, perfect) == pytest.approx(1.0, abs=1e-9)
    # A map unrelated to the masks has PRO ~= FPR: about fpr_limit / 2 = 0.15.
    assert aupro(masks, noise) == pytest.approx(0.15, abs=0.03)


@pytest.mark.parametrize(
    ("masks", "maps", "message"),
    [
        (np.zeros((1, 2, 2)), np.ones((1, 2, 2)), "anomalous region"),
        (np.ones((1, 2, 2)), np.ones((1, 2, 2)), "normal"),
        (np.zeros((1, 2, 2)), np.zeros((2, 2, 2)), r"masks \(1, 2, 2\) and maps \(2, 2, 2\)"),
        (np.zeros((2, 2)), np.zeros((2, 2)), r"\(N, H, W\)"),
    ],
)
def test_aupro_invalid_inputs(masks: np.ndarray, maps: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aupro(masks, maps)


# --------------------------------------------------------------------------- calibration and summary


def test_threshold_from_quantile_linear() -> None:
    # Sorted 0..100: the 0.99 quantile sits at index 0.99 * 100 = 99 exactly.
    assert threshold_from_quantile(range(101), 0.99) == pytest.approx(99.0)
    # Between samples NumPy interpolates linearly: [0, 10] at 0.25 -> 2.5.
    assert threshold_from_quantile([10.0, 0.0], 0.25) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="quantile"):
        threshold_from_quantile([1.0], 1.5)


def test_compute_metrics_keys_and_ranges() -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 16, 16), dtype=np.uint8)
    masks[3:, 4:9, 5:12] = 1
    maps = 0.6 * masks + rng.random(masks.shape)
    labels = [0, 0, 0, 1, 1, 1]
    scores = maps.reshape(6, -1).max(axis=1)
    result = compute_metrics(labels, scores, masks, maps)
    assert set(result) == {
        "image_auroc",
        "pixel_auroc",
        "pixel_aupro",
        "pixel_ap",
        "image_f1_max",
        "image_f1_threshold",
    }
    for key, value in result.items():
        assert isinstance(value, float)
        if key != "image_f1_threshold":
            assert 0.0 <= value <= 1.0, key
    # An informative map must beat chance on every ranking metric.
    assert result["pixel_auroc"] > 0.7 and result["pixel_aupro"] > 0.3


def test_compute_metrics_count_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="3 labels but 2"):
        compute_metrics([0, 1, 1], [0.1, 0.5, 0.9], np.ones((2, 2, 2)), np.ones((2, 2, 2)))


def test_per_defect_type_separates_what_the_overall_figure_mixes() -> None:
    # Two good images, a "hole" the model finds (high score, map hot on its mask) and an "uneven" one it
    # misses (low score, map cold on its large mask): apart, one type scores 1.0 and the other 0.0.
    labels = [0, 0, 1, 1]
    scores = [0.2, 0.3, 0.9, 0.1]
    masks = np.zeros((4, 2, 2))
    masks[2, 0, 0] = 1
    masks[3, :, :1] = 1
    maps = np.full((4, 2, 2), 0.5)
    maps[2, 0, 0] = 0.9
    maps[3, :, :1] = 0.1
    types = ["good", "good", "hole", "uneven"]
    result = per_defect_type(labels, scores, masks, maps, types)
    assert sorted(result) == ["hole", "uneven"]
    assert result["hole"] == {"images": 1, "image_auroc": 1.0, "pixel_auroc": 1.0, "pixel_ap": 1.0,
                              "defect_area": 0.25}
    assert result["uneven"]["image_auroc"] == 0.0
    assert result["uneven"]["pixel_auroc"] == 0.0
    assert result["uneven"]["defect_area"] == 0.5


def test_per_defect_type_needs_good_images() -> None:
    with pytest.raises(ValueError, match="needs good images"):
        per_defect_type([1, 1], [0.1, 0.2], np.ones((2, 2, 2)), np.ones((2, 2, 2)), ["a", "b"])

"""Anomaly-detection metrics: image/pixel AUROC, pixel AP, F1-max, AUPRO and threshold calibration.

NumPy, scikit-learn and scikit-image only, so evaluation does not need torch.
Conventions: label 1 / mask > 0 means anomalous; a higher score or map value means more anomalous.
Masks and maps are stacks of shape (N, H, W) at the same resolution.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from skimage.measure import label as label_regions
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

__all__ = [
    "aupro",
    "compute_metrics",
    "f1_max",
    "image_auroc",
    "per_defect_type",
    "pixel_ap",
    "pixel_auroc",
    "threshold_from_f1",
    "threshold_from_quantile",
]


# --------------------------------------------------------------------------- input checks


def _as_image_inputs(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate per-image labels (0/1) and scores; return them as int64 and float64 1-D arrays."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape[0] != s.shape[0]:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must contain only 0 (good) and 1 (anomalous)")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return y.astype(np.int64), s


def _as_masks_and_maps(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N, H, W) masks and maps; return boolean masks (> 0) and float maps."""
    gt = np.asarray(masks)
    amap = np.asarray(maps)
    if gt.shape != amap.shape:
        raise ValueError(
            f"masks and maps must have the same shape, got masks {gt.shape} and maps {amap.shape}"
        )
    if gt.ndim != 3:
        raise ValueError(f"masks and maps must be (N, H, W) stacks, got shape {gt.shape}")
    if gt.size == 0:
        raise ValueError(f"masks and maps are empty (shape {gt.shape})")
    # Keep float32 maps as they are: a float64 copy of a large evaluation stack doubles memory.
    if amap.dtype not in (np.float32, np.float64):
        amap = amap.astype(np.float64)
    if not np.isfinite(amap).all():
        raise ValueError("maps contain NaN or infinite values")
    return gt > 0, amap


def _require_both_classes(y: np.ndarray, metric: str) -> None:
    """AUROC is undefined with one class; say so instead of letting sklearn warn or fail obscurely."""
    n_anomalous = int(np.count_nonzero(y))
    if n_anomalous == 0 or n_anomalous == y.size:
        only = "anomalous" if n_anomalous else "good"
        raise ValueError(f"{metric} needs both good and anomalous samples, got only {only} ones")


# --------------------------------------------------------------------------- image level


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of per-image scores."""
    y, s = _as_image_inputs(labels, scores)
    _require_both_classes(y, "image_auroc")
    return float(roc_auc_score(y, s))


def f1_max(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it (anomalous when score >= threshold).

    On ties the lowest such threshold is returned.
    """
    y, s = _as_image_inputs(labels, scores)
    if not y.any():
        raise ValueError("f1_max needs at least one anomalous label")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # sklearn appends a final (precision=1, recall=0) point that has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def threshold_from_f1(labels: ArrayLike, scores: ArrayLike) -> float:
    """Decision threshold that maximises image-level F1."""
    return f1_max(labels, scores)[1]


def threshold_from_quantile(good_scores: ArrayLike, quantile: float = 0.99) -> float:
    """Threshold at a quantile of scores from good images only (linear interpolation, NumPy's default).

    Used when no anomalous validation images exist: about (1 - quantile) of good images get flagged.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    s = np.asarray(good_scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("good_scores is empty")
    if not np.isfinite(s).all():
        raise ValueError("good_scores contain NaN or infinite values")
    return float(np.quantile(s, quantile))


# --------------------------------------------------------------------------- pixel level


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """Area under the ROC curve over all pixels of all images."""
    gt, amap = _as_masks_and_maps(masks, maps)
    _require_both_classes(gt.ravel(), "pixel_auroc")
    return float(roc_auc_score(gt.ravel(), amap.ravel()))


def pixel_ap(masks: ArrayLike, maps: ArrayLike) -> float:
    """Average precision over all pixels of all images."""
    gt, amap = _as_masks_and_maps(masks, maps)
    if not gt.any():
        raise ValueError("pixel_ap needs at least one anomalous pixel in masks")
    return float(average_precision_score(gt.ravel(), amap.ravel()))


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3, num_thresholds: int = 200) -> float:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit`` FPR, divided by ``fpr_limit``.

    Regions are the 8-connected components of each ground-truth mask. At a threshold, PRO is the mean
    over all regions of the fraction of the region flagged, and FPR is the fraction of all normal
    pixels flagged. A perfect map scores 1.0; an uninformative one (PRO = FPR) about fpr_limit / 2.

    Thresholds are taken at ``num_thresholds`` quantiles of the normal-pixel values, spaced evenly in
    FPR over [0, fpr_limit], each evaluated at and just above the value, plus the lowest map value
    (FPR 1). The curve is exact when the normal pixels in that FPR range number at most about
    ``num_thresholds``; otherwise the discretisation error is at most about 1 / num_thresholds.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}")
    gt, amap = _as_masks_and_maps(masks, maps)

    # Region id of every anomalous pixel, unique across the stack. Labelling image by image keeps
    # regions from connecting across neighbouring images.
    region_ids = []
    n_regions = 0
    for mask in gt:
        components, count = label_regions(mask, connectivity=2, return_num=True)
        region_ids.append(components[mask] - 1 + n_regions)
        n_regions += count
    if n_regions == 0:
        raise ValueError("aupro needs at least one anomalous region in masks")
    normal = amap[~gt]
    if normal.size == 0:
        raise ValueError("aupro needs at least one normal (mask == 0) pixel")
    # amap[gt] walks the stack in the same C order as the per-image components[mask] above.
    anomalous = amap[gt]
    ids = np.concatenate(region_ids)

    # Weighting each anomalous pixel by 1 / (its region size * number of regions) turns the summed
    # weight of flagged pixels into the mean per-region overlap, so no per-region loop is needed.
    sizes = np.bincount(ids, minlength=n_regions)
    weights = 1.0 / (sizes[ids] * float(n_regions))

    thresholds = _pro_thresholds(normal, amap.min(), fpr_limit, num_thresholds)
    fpr = _count_at_or_above(normal, thresholds) / normal.size
    pro = np.clip(_count_at_or_above(anomalous, thresholds, weights), 0.0, 1.0)
    # Thresholds are ascending; reversed, both FPR and PRO are non-decreasing from the FPR-0 point.
    area = _normalised_partial_area(fpr[::-1], pro[::-1], fpr_limit)
    return float(np.clip(area, 0.0, 1.0))


def _pro_thresholds(normal: np.ndarray, lowest: float, fpr_limit: float, num: int) -> np.ndarray:
    """Ascending thresholds for the PRO curve, concentrated where FPR <= fpr_limit.

    Quantiles of the normal pixels space the curve points evenly in FPR over the integrated range;
    a linspace over the value range can leave that range with few points when maps are skewed.
    """
    n = normal.size
    levels = np.linspace(0.0, fpr_limit, num)
    # In ascending order, normal value at rank floor(n * (1 - f)) flags a fraction >= f of normal pixels.
    ranks = np.unique(np.clip(np.floor(n * (1.0 - levels)).astype(np.int64), 0, n - 1))
    picks = np.partition(normal, ranks)[ranks]
    # Just above a value v no pixel equal to v is flagged; with the point at v this captures the
    # vertical jumps of the exact curve. Above the largest normal value the FPR is exactly 0.
    above = np.nextafter(picks, np.array(np.inf, dtype=picks.dtype))
    lowest_arr = np.array([lowest], dtype=picks.dtype)  # flags every pixel: FPR 1, PRO 1
    return np.unique(np.concatenate([picks, above, lowest_arr]))


def _count_at_or_above(
    values: np.ndarray, thresholds: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """(Weighted) count of values >= each ascending threshold, in one pass over the values."""
    # bins[i] = number of thresholds <= values[i], so value i is flagged at threshold k iff k < bins[i].
    bins = np.searchsorted(thresholds, values, side="right")
    hist = np.bincount(bins, weights=weights, minlength=thresholds.size + 1)
    at_or_above = np.cumsum(hist[::-1])[::-1]  # at_or_above[k] = sum of hist[k:]
    return at_or_above[1:]


def _normalised_partial_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) from x[0] (= 0) to ``limit``, divided by ``limit``; x is sorted."""
    inside = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    xs, ys = x[:inside], y[:inside]
    if inside < x.size and xs[-1] < limit:
        # Close the curve at the limit by interpolating the segment that crosses it.
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        xs, ys = np.append(xs, limit), np.append(ys, y_limit)
    area = np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0
    return float(area / limit)


# --------------------------------------------------------------------------- all at once


def compute_metrics(
    labels: ArrayLike, scores: ArrayLike, masks: ArrayLike, maps: ArrayLike
) -> dict[str, float]:
    """All evaluation metrics for one category: image-level from scores, pixel-level from maps."""
    y, s = _as_image_inputs(labels, scores)
    gt, amap = _as_masks_and_maps(masks, maps)
    if gt.shape[0] != y.size:
        raise ValueError(f"got {y.size} labels but {gt.shape[0]} masks/maps")
    f1, threshold = f1_max(y, s)
    return {
        "image_auroc": image_auroc(y, s),
        "pixel_auroc": pixel_auroc(gt, amap),
        "pixel_aupro": aupro(gt, amap),
        "pixel_ap": pixel_ap(gt, amap),
        "image_f1_max": f1,
        "image_f1_threshold": threshold,
    }


def per_defect_type(
    labels: ArrayLike, scores: ArrayLike, masks: ArrayLike, maps: ArrayLike, defect_types: ArrayLike
) -> dict[str, dict[str, float]]:
    """Image AUROC, pixel AUROC and pixel AP of each defect type against all good images.

    A category's overall figures mix its defect types by count and by area: one type with large masks
    can decide the pixel AUROC alone. Apart, they show which kind of defect the model misses.
    """
    y, s = _as_image_inputs(labels, scores)
    gt, amap = _as_masks_and_maps(masks, maps)
    types = np.asarray(defect_types).astype(str)
    if types.shape != y.shape or gt.shape[0] != y.size:
        raise ValueError(f"got {y.size} labels, {types.size} defect types and {gt.shape[0]} masks/maps")
    good = y == 0
    if not good.any():
        raise ValueError("per_defect_type needs good images to compare each defect type with")
    result = {}
    for name in sorted(set(types[~good])):
        chosen = good | (types == name)
        entry = {"images": int(np.count_nonzero(types == name)), "image_auroc": image_auroc(y[chosen], s[chosen])}
        if gt[chosen].any():
            entry["pixel_auroc"] = pixel_auroc(gt[chosen], amap[chosen])
            entry["pixel_ap"] = pixel_ap(gt[chosen], amap[chosen])
            entry["defect_area"] = float(gt[types == name].mean())
        result[name] = entry
    return result

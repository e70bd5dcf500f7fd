"""Parity: does the exported graph compute what the PyTorch model computes, at every batch size?

Two comparisons, with the same report shape (a dict a benchmark can print):
- ONNX Runtime (CPU) against PyTorch, fp32: maps within 1e-4, scores within 1e-5;
- a TensorRT engine against ONNX Runtime (tensorrt_engine.py), with looser bounds for fp16.
Each runs the candidate at several batch sizes over the same images, and also checks that an image's
result does not depend on its batch (the candidate alone against itself in the largest batch).

The references are computed once, in batches of 8: their own batch independence is what the model's
tests check. torch is imported only inside `onnx_vs_torch`, so the TensorRT check runs without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .bundle import CATEGORY_INPUT, INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT

log = logging.getLogger("diffad.export")

# images (NCHW, the graph's dtype) -> (maps [N, 1, H, W], scores [N]), both float32. A runner of a
# multi-category graph also takes the images' category indices (int64 [N]): runner(images, categories).
Runner = Callable[..., tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Tolerance:
    map: float     # max abs difference of anomaly-map pixels (values in [0, 1])
    score: float   # max abs difference of image scores

    def to_dict(self) -> dict:
        return {"map": self.map, "score": self.score}


# fp32 against fp32: only summation order differs, so differences stay near float32 rounding.
ONNX_TOLERANCE = Tolerance(map=1e-4, score=1e-5)
# TensorRT picks its own kernels (Winograd, split-K) even in fp32, hence 10x the ONNX bound; fp16 keeps
# 10-11 bits of mantissa, so maps agree to about 1e-2 and the top-k mean averages the error down.
TENSORRT_TOLERANCES = {"fp32": Tolerance(map=1e-3, score=1e-4), "fp16": Tolerance(map=1e-2, score=5e-3)}


def parity_images(size: int, channels: int, count: int = 8, seed: int = 0) -> np.ndarray:
    """Deterministic test images at the model's size, uint8 NCHW: half good texture, half with a defect.

    Generated in code (diffad.training.demo_data), so a parity check needs no dataset; defects make the
    maps non-trivial where random noise would saturate them.
    """
    from ..training.demo_data import DEFECT_TYPES, add_defect, good_texture

    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        image = good_texture(size, rng, channels)
        if i % 2:
            image, _ = add_defect(image, DEFECT_TYPES[(i // 2) % len(DEFECT_TYPES)], rng)
        images.append(image[None] if image.ndim == 2 else image.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(images))


def as_graph_input(images_uint8: np.ndarray, input_dtype: str) -> np.ndarray:
    """uint8 images as the graph takes them: unchanged, or float32 in [0, 1]."""
    if input_dtype == "uint8":
        return images_uint8
    return images_uint8.astype(np.float32) / np.float32(255.0)


def graph_feed(session, images: np.ndarray, categories: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The inputs of one call of an ONNX Runtime session on a bundle's graph: the images and, for a graph
    that takes each image's category (a multi-category bundle), their category indices, which it needs."""
    feed = {INPUT_NAME: images}
    if any(i.name == CATEGORY_INPUT for i in session.get_inputs()):
        if categories is None:
            raise ValueError(f"this graph takes each image's category ({CATEGORY_INPUT!r}): give the indices")
        feed[CATEGORY_INPUT] = np.asarray(categories, dtype=np.int64).reshape(len(images))
    return feed


def bundle_categories(bundle, count: int) -> np.ndarray | None:
    """What a bundle's model feeds its graph's category input for `count` images: its own category index
    (a model of a multi-category bundle; the first category for the bundle itself), or None where the graph
    takes the images alone."""
    if bundle.category_input is None:
        return None
    return np.full(count, bundle.category_index or 0, dtype=np.int64)


def onnxruntime_runner(onnx_path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=list(providers))

    def run(images: np.ndarray, categories: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = session.run([MAP_OUTPUT, SCORE_OUTPUT], graph_feed(session, images, categories))
        return maps, scores

    return run


def run_in_batches(runner: Runner, images: np.ndarray, batch_size: int, whole_batches_only: bool = True,
                   categories: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run batches of batch_size over the images (and their categories, for a multi-category graph); by
    default a remainder is left out, so that every call has exactly batch_size images (what a parity check
    at that batch size means)."""
    usable = len(images) // batch_size * batch_size if whole_batches_only else len(images)
    if usable == 0:
        raise ValueError(f"need at least {batch_size} images for batch size {batch_size}, got {len(images)}")
    results = []
    for i in range(0, usable, batch_size):
        batch = slice(i, min(i + batch_size, usable))
        results.append(runner(images[batch]) if categories is None else runner(images[batch], categories[batch]))
    return np.concatenate([m for m, _ in results]), np.concatenate([s for _, s in results])


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def compare(reference: tuple[np.ndarray, np.ndarray], candidate: Runner, images: np.ndarray,
            batch_sizes: Sequence[int], tolerance: Tolerance, reference_name: str, candidate_name: str,
            categories: np.ndarray | None = None) -> dict:
    """The candidate at each batch size against the reference's (maps, scores) for the same images (of
    these categories, for a multi-category graph: batches then mix them)."""
    ref_maps, ref_scores = reference
    report = {"reference": reference_name, "candidate": candidate_name, "images": len(images),
              "tolerance": tolerance.to_dict(), "batches": {}, "failures": []}
    per_batch = {}
    for b in sorted(set(batch_sizes)):
        maps, scores = run_in_batches(candidate, images, b, categories=categories)
        n = len(scores)
        if maps.shape != ref_maps[:n].shape or scores.shape != ref_scores[:n].shape:
            report["failures"].append(f"batch {b}: shapes {maps.shape}, {scores.shape} differ from the "
                                      f"reference's {ref_maps[:n].shape}, {ref_scores[:n].shape}")
            continue
        per_batch[b] = (maps, scores)
        figures = {"images": n, "map_max_abs_diff": _max_diff(maps, ref_maps[:n]),
                   "score_max_abs_diff": _max_diff(scores, ref_scores[:n])}
        report["batches"][str(b)] = figures
        _check(report, f"batch {b}", figures, tolerance)
    if len(per_batch) >= 2:
        # The same image alone (smallest batch) and inside the largest batch: the fixed noise makes
        # them equal up to kernel rounding, so the score bound applies to both.
        (_, (small_maps, small_scores)), (_, (big_maps, big_scores)) = min(per_batch.items()), max(per_batch.items())
        n = min(len(small_scores), len(big_scores))
        figures = {"batch_sizes": [min(per_batch), max(per_batch)], "images": n,
                   "map_max_abs_diff": _max_diff(small_maps[:n], big_maps[:n]),
                   "score_max_abs_diff": _max_diff(small_scores[:n], big_scores[:n])}
        report["batch_independence"] = figures
        _check(report, "alone vs in a batch", figures, tolerance)
    report["map_max_abs_diff"] = max((f["map_max_abs_diff"] for f in report["batches"].values()), default=None)
    report["score_max_abs_diff"] = max((f["score_max_abs_diff"] for f in report["batches"].values()), default=None)
    report["passed"] = not report["failures"] and bool(report["batches"])
    return report


def _check(report: dict, what: str, figures: dict, tolerance: Tolerance) -> None:
    if not figures["map_max_abs_diff"] <= tolerance.map:  # `not <=` so that NaN fails too
        report["failures"].append(f"{what}: maps differ by {figures['map_max_abs_diff']:.3g} > {tolerance.map:g}")
    if not figures["score_max_abs_diff"] <= tolerance.score:
        report["failures"].append(
            f"{what}: scores differ by {figures['score_max_abs_diff']:.3g} > {tolerance.score:g}")


def onnx_vs_torch(model, onnx_path, input_dtype: str, images_uint8: np.ndarray | None = None,
                  batch_sizes: Sequence[int] = (1, 8), tolerance: Tolerance = ONNX_TOLERANCE,
                  categories: np.ndarray | None = None) -> dict:
    """ONNX Runtime (CPU) against the PyTorch model on the same images; see `compare` for the report.
    categories: for a multi-category graph, each image's category index (mixed within every batch)."""
    import torch

    cfg = model.config
    if images_uint8 is None:
        images_uint8 = parity_images(cfg.image_size, cfg.in_channels, count=max(batch_sizes))
    model.eval()

    @torch.inference_mode()
    def run_torch(images: np.ndarray, classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        batch = torch.from_numpy(images).float() / 255.0
        maps, scores = model(batch) if classes is None else model(batch, torch.from_numpy(classes))
        return maps.numpy(), scores.numpy()

    reference = run_in_batches(run_torch, images_uint8, 8, whole_batches_only=False, categories=categories)
    report = compare(reference, onnxruntime_runner(onnx_path), as_graph_input(images_uint8, input_dtype),
                     batch_sizes, tolerance, f"pytorch {torch.__version__} (fp32, CPU)",
                     "onnxruntime CPUExecutionProvider", categories=categories)
    log_report(report)
    return report


def log_report(report: dict) -> None:
    for b, f in report["batches"].items():
        log.info("parity %s vs %s, batch %s: maps %.2e, scores %.2e (max abs diff; bounds %g, %g)",
                 report["candidate"], report["reference"], b, f["map_max_abs_diff"], f["score_max_abs_diff"],
                 report["tolerance"]["map"], report["tolerance"]["score"])
    if "batch_independence" in report:
        f = report["batch_independence"]
        log.info("parity %s alone vs in a batch of %d: maps %.2e, scores %.2e", report["candidate"],
                 f["batch_sizes"][1], f["map_max_abs_diff"], f["score_max_abs_diff"])
    for failure in report["failures"]:
        log.error("parity failed: %s", failure)

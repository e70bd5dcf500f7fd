"""The model bundle: a folder that a server can load without PyTorch.

    BUNDLE_DIR/bundle.json          what the model is, how to feed it, how to read its score, file hashes
    BUNDLE_DIR/model.onnx           the whole one-step pipeline as one graph (images in, map and score out)
    BUNDLE_DIR/model.fp16.onnx      the same graph with both networks in fp16 (for TensorRT 11's fp16 engines)
    BUNDLE_DIR/model.safetensors    the PyTorch weights (so `diffad evaluate BUNDLE_DIR DATA` works too)
    BUNDLE_DIR/model.<gpu>.trt<version>.<fp16|fp32>.engine   TensorRT engines, where built

A DeCo-Diff bundle ("method": "decodiff") trained on several categories holds one graph, model.onnx, that
takes each image's category as a second input (`category`, int64 [batch]: the index into `categories`), so
one set of weights serves them all and a batch may mix them. bundle.json's `models` list gives each category
its name (<bundle>.<category>), index and calibrated threshold; a server serves each as a model of its own
(`Bundle.models`) on one backend and one batcher. The top-level `threshold` and `score_normalization` are
the first category's. (Bundles exported before this held one graph per category, model.<category>.onnx,
named in each `models` entry's `onnx`; they still load, and serve one backend per category.)

bundle.json lists the SHA-256 of every other file in the folder; `load_bundle` checks them all, so a
truncated copy or a swapped file is refused before a single image is scored. This module uses the
standard library and numpy only: the serving path imports it, and the serving image carries no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MANIFEST_FILE = "bundle.json"
ONNX_FILE = "model.onnx"
ONNX_FP16_FILE = "model.fp16.onnx"  # the same pipeline with its networks in fp16 (TensorRT 11 fp16 engines)
WEIGHTS_FILE = "model.safetensors"

# The graph's interface, fixed by the bundle's schema.
INPUT_NAME = "images"
CATEGORY_INPUT = "category"  # a multi-category DeCo-Diff graph's second input: each image's category index
MAP_OUTPUT, SCORE_OUTPUT = "anomaly_map", "score"
INPUT_DTYPES = ("uint8", "float32")
INPUT_RANGES = {"uint8": [0, 255], "float32": [0.0, 1.0]}

NORMALIZATION_FORMULA = "clip(0.5 + (score - threshold) / (score_max - score_min), 0, 1)"

METHODS = ("diffusionad", "decodiff")  # bundle.json's "method"; a bundle without one is DiffusionAD's
REQUIRED_FIELDS = (
    "schema_version", "name", "created_at", "diffad_version", "input", "outputs", "threshold",
    "score_normalization", "training", "validation", "onnx", "engines", "files",
)
# The one-step pipeline's constants, which only DiffusionAD bundles have.
DIFFUSIONAD_FIELDS = ("t_s", "t_l", "w", "noise_seed", "top_k")
REQUIRED_INPUT_FIELDS = ("name", "size", "channels", "dtype", "layout", "range")


class BundleError(ValueError):
    """A missing, corrupted or incompatible bundle; the message names the file at fault."""


@dataclass(frozen=True)
class InputSpec:
    """How to feed the graph: NCHW batches of size x size images with `channels` channels."""

    name: str
    size: int
    channels: int
    dtype: str          # "uint8" (0..255) or "float32" (0..1)
    layout: str         # always "NCHW"
    range: tuple[float, float]


@dataclass(frozen=True)
class ScoreNormalization:
    """The calibrated threshold and the 0..1 scale around it (the same rule as evaluation.Calibration)."""

    threshold: float
    method: str
    score_min: float
    score_max: float
    num_images: int
    formula: str = NORMALIZATION_FORMULA

    def normalize(self, score: float | np.ndarray) -> float | np.ndarray:
        """0.5 at the threshold, scaled by the calibration's score range, clipped to [0, 1]."""
        span = max(self.score_max - self.score_min, 1e-12)
        result = np.clip(0.5 + (np.asarray(score, dtype=np.float64) - self.threshold) / span, 0.0, 1.0)
        return float(result) if result.ndim == 0 else result


@dataclass(frozen=True)
class Bundle:
    """A loaded and verified bundle. `manifest` is bundle.json as read; the fields are its main parts."""

    path: Path
    name: str
    input: InputSpec
    t_s: int | None          # DiffusionAD's constants; None in a DeCo-Diff bundle
    t_l: int | None
    w: float | None
    noise_seed: int | None
    top_k: int | None
    threshold: float | None
    normalization: ScoreNormalization | None
    engines: tuple[dict, ...]
    manifest: dict
    method: str = "diffusionad"
    category: str | None = None  # the class condition this model's graph was exported for (DeCo-Diff)
    category_index: int | None = None  # with a shared graph (category_input): the index this model feeds it

    def models(self) -> tuple[Bundle, ...]:
        """The models this bundle serves: itself, or one per category of a multi-category bundle (each with
        its own name <bundle>.<category>, threshold and category index into the shared graph, or, in a bundle
        from before the shared graph, its own graph; the folder and its files are shared)."""
        entries = self.manifest.get("models")
        if not entries:
            return (self,)
        views = []
        for index, entry in enumerate(entries):
            try:
                manifest = {**self.manifest, "name": entry["name"], "category": entry["category"],
                            "onnx": entry.get("onnx", self.manifest["onnx"]), "threshold": entry["threshold"],
                            "score_normalization": entry["score_normalization"], "engines": [], "models": []}
                if "onnx" not in entry:  # the shared graph: this model is one index of its category input
                    manifest["category_index"] = int(entry.get("category_index", index))
            except (KeyError, TypeError, ValueError) as e:
                raise BundleError(f"{self.path / MANIFEST_FILE}: an entry of `models` lacks {e}") from e
            views.append(_bundle_from_manifest(self.path, manifest))
        return tuple(views)

    @property
    def category_input(self) -> str | None:
        """The graph's category input (CATEGORY_INPUT) when it takes one: a multi-category bundle's shared
        graph, which every one of its models feeds with its own category_index."""
        return self.manifest["onnx"].get("category_input")

    @property
    def onnx_path(self) -> Path:
        return self.path / self.manifest["onnx"]["file"]

    @property
    def onnx_fp16_path(self) -> Path | None:
        """The fp16 graph (networks in fp16, the rest fp32), or None for a bundle exported without one."""
        block = self.manifest.get("onnx_fp16")
        return self.path / block["file"] if block else None

    @property
    def version(self) -> str:
        """The bundle's identity beside its name: the first 12 hex digits of model.onnx's SHA-256 (from
        bundle.json), so a new export of other weights is a new version and a copy is the same one."""
        return str(self.manifest.get("files", {}).get(self.manifest["onnx"]["file"], ""))[:12] or "unversioned"

    @property
    def calibrated(self) -> bool:
        return self.normalization is not None

    def normalize_score(self, score: float | np.ndarray) -> float | np.ndarray:
        """The raw image score on the calibrated 0..1 scale (0.5 = the threshold)."""
        if self.normalization is None:
            raise BundleError(f"{self.path / MANIFEST_FILE} has no calibration (threshold null): run "
                              "`diffad evaluate RUN_DIR DATA_DIR` on the run, then export it again")
        return self.normalization.normalize(score)

    def is_anomalous(self, score: float | np.ndarray, threshold: float | None = None) -> bool | np.ndarray:
        """score >= threshold (the bundle's calibrated one unless given)."""
        limit = self.threshold if threshold is None else threshold
        if limit is None:
            raise BundleError(f"{self.path / MANIFEST_FILE} has no calibrated threshold: give one explicitly")
        result = np.asarray(score) >= limit
        return bool(result) if result.ndim == 0 else result


# --- hashing and writing -------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# Left by an interrupted write (ours: bundle.json.tmp; editors' and tools' alike): never sealed into a bundle.
TEMPORARY_SUFFIXES = (".tmp", ".part", ".swp", "~")


def bundle_files(bundle_dir: str | Path) -> list[str]:
    """Every file of the bundle except bundle.json and temporary files, as paths relative to the bundle
    (sorted)."""
    root = Path(bundle_dir)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).as_posix() != MANIFEST_FILE
                  and not p.name.endswith(TEMPORARY_SUFFIXES))


def contained_path(bundle_dir: Path, name: str) -> Path:
    """bundle_dir / name, refused unless it stays inside the bundle: a key like "../x" or "/etc/x" in
    bundle.json must not make the service read (and hash) files elsewhere."""
    if isinstance(name, str) and name and not Path(name).is_absolute():
        path = (bundle_dir / name).resolve()
        if path.is_relative_to(bundle_dir.resolve()):
            return path
    raise BundleError(f"{bundle_dir / MANIFEST_FILE} lists a file outside the bundle: {str(name)[:200]!r}")


def seal_bundle(bundle_dir: str | Path, manifest: dict) -> dict:
    """Hash every file in the folder into manifest["files"] and write bundle.json (atomically).

    bundle.json is written last and by rename, so a folder with a bundle.json is always complete.
    Returns the manifest as written.
    """
    bundle_dir = Path(bundle_dir)
    manifest = {**manifest, "schema_version": SCHEMA_VERSION,
                "files": {name: sha256_file(bundle_dir / name) for name in bundle_files(bundle_dir)}}
    missing = missing_fields(manifest)
    if missing:
        raise BundleError(f"refusing to write {bundle_dir / MANIFEST_FILE} without {', '.join(missing)}")
    tmp = bundle_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, bundle_dir / MANIFEST_FILE)
    return manifest


def normalization_from_calibration(calibration: dict | None) -> dict | None:
    """The score_normalization block of bundle.json from a run's calibration.json content."""
    if calibration is None:
        return None
    return {"threshold": float(calibration["threshold"]), "method": calibration["method"],
            "score_min": float(calibration["score_min"]), "score_max": float(calibration["score_max"]),
            "num_images": int(calibration["num_images"]), "formula": NORMALIZATION_FORMULA}


# --- loading -------------------------------------------------------------------------------------
def read_manifest(bundle_dir: str | Path) -> dict:
    """bundle.json as a dict, after checking its schema version and required fields (not the hashes)."""
    path = Path(bundle_dir) / MANIFEST_FILE
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"bundle folder not found: {bundle_dir}")
    if not path.is_file():
        raise BundleError(f"{path} is missing: {bundle_dir} is not a model bundle (make one with `diffad export`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} does not hold a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path} has schema_version {version!r}; this diffad reads schema_version "
                          f"{SCHEMA_VERSION}: export the model again with this version")
    missing = missing_fields(manifest)
    missing += [f"input.{f}" for f in REQUIRED_INPUT_FIELDS if f not in (manifest.get("input") or {})]
    if "onnx" in manifest and "file" not in (manifest["onnx"] or {}):
        missing.append("onnx.file")
    if missing:
        raise BundleError(f"{path} lacks required fields: {', '.join(missing)}")
    return manifest


def missing_fields(manifest: dict) -> list[str]:
    method = manifest.get("method", "diffusionad")
    if method not in METHODS:
        raise BundleError(f"bundle.json names method {method!r}; this diffad serves {', '.join(METHODS)}")
    required = REQUIRED_FIELDS + (DIFFUSIONAD_FIELDS if method == "diffusionad" else ())
    return [f for f in required if f not in manifest]


def verify_files(bundle_dir: str | Path, manifest: dict) -> None:
    """Every file listed in bundle.json exists and has its recorded SHA-256; the model files are listed."""
    bundle_dir = Path(bundle_dir)
    files: dict[str, str] = manifest["files"]
    referenced = [manifest["onnx"]["file"]] + [e["file"] for e in manifest["engines"]]
    referenced += [graph["file"] for graph in _category_graphs(manifest)]
    for name in referenced:
        if name not in files:
            raise BundleError(f"{bundle_dir / MANIFEST_FILE} does not list a hash for {name}")
    for name, expected in files.items():
        path = contained_path(bundle_dir, name)
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path} (listed in {bundle_dir / MANIFEST_FILE})")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"bundle file corrupted: {path} has SHA-256 {actual[:16]}..., "
                              f"{MANIFEST_FILE} says {expected[:16]}...")


def _category_graphs(manifest: dict) -> list[dict]:
    """The `onnx` blocks of a bundle's `models` entries: an older multi-category bundle's graph per category
    (a shared-graph bundle's entries have none)."""
    return [m["onnx"] for m in manifest.get("models") or [] if isinstance(m, dict) and "onnx" in m]


def load_bundle(bundle_dir: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle: schema version, required fields and (unless verify=False) every hash."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    for entry in [manifest["onnx"], *manifest["engines"], *_category_graphs(manifest)]:
        contained_path(bundle_dir, entry["file"])  # what the backends open, even unverified
    if verify:
        verify_files(bundle_dir, manifest)
    return _bundle_from_manifest(bundle_dir, manifest)


def _optional(value, kind):
    return None if value is None else kind(value)


def _bundle_from_manifest(bundle_dir: Path, manifest: dict) -> Bundle:
    try:
        inp = manifest["input"]
        spec = InputSpec(inp["name"], int(inp["size"]), int(inp["channels"]), inp["dtype"], inp["layout"],
                         tuple(inp["range"]))
        norm = manifest["score_normalization"]
        normalization = None if norm is None else ScoreNormalization(
            float(norm["threshold"]), norm["method"], float(norm["score_min"]), float(norm["score_max"]),
            int(norm["num_images"]), norm.get("formula", NORMALIZATION_FORMULA))
        threshold = manifest["threshold"]
        return Bundle(
            path=bundle_dir, name=manifest["name"], input=spec, t_s=_optional(manifest.get("t_s"), int),
            t_l=_optional(manifest.get("t_l"), int), w=_optional(manifest.get("w"), float),
            noise_seed=_optional(manifest.get("noise_seed"), int), top_k=_optional(manifest.get("top_k"), int),
            threshold=None if threshold is None else float(threshold), normalization=normalization,
            engines=tuple(manifest["engines"]), manifest=manifest, method=manifest.get("method", "diffusionad"),
            category=manifest.get("category"), category_index=_optional(manifest.get("category_index"), int))
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{bundle_dir / MANIFEST_FILE} has a malformed field: {e!r}") from e


def describe_input(size: int, channels: int, dtype: str) -> dict[str, Any]:
    """The input block of bundle.json; `color` and `resize` say how to turn a picture into the batch."""
    if dtype not in INPUT_DTYPES:
        raise ValueError(f"input dtype must be one of {', '.join(INPUT_DTYPES)}, got {dtype!r}")
    return {"name": INPUT_NAME, "size": size, "channels": channels, "dtype": dtype, "layout": "NCHW",
            "range": INPUT_RANGES[dtype], "color": "L" if channels == 1 else "RGB",
            "resize": f"bilinear to {size}x{size} (Pillow), as in training"}


def describe_outputs(size: int, score_meaning: str) -> dict[str, Any]:
    return {
        MAP_OUTPUT: {"shape": ["batch", 1, size, size], "dtype": "float32", "range": [0.0, 1.0],
                     "meaning": "per-pixel anomaly probability at the model's resolution"},
        SCORE_OUTPUT: {"shape": ["batch"], "dtype": "float32", "range": [0.0, 1.0],
                       "meaning": score_meaning},
    }

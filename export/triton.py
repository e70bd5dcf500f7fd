"""`diffad export-triton`: model bundles as an NVIDIA Triton Inference Server model repository.

    REPO/<name>/config.pbtxt        backend onnxruntime (or platform tensorrt_plan), batching, calibration
    REPO/<name>/<version>/          the bundle itself: model.onnx, bundle.json, weights, any engines

Each version folder is a complete, verified bundle (Triton ignores the files it does not load), so the
diffad gateway (DIFFAD_BACKEND=triton) reads its thresholds from the very version it asks Triton for, and
`diffad evaluate` works on it too. Versions are numbered 1, 2, ...: exporting a bundle whose model.onnx is
already a version reuses that number; another one becomes the next. config.pbtxt describes the newest:
its `parameters` carry the newest version's calibration, so a client that talks to Triton directly needs
nothing else. The batch axis is Triton's (max_batch_size > 0), so the per-image score of shape [batch]
is given as dims [1] with `reshape { shape: [] }`: Triton allows no rank-0 tensors.

The text is written here (no protobuf needed to export); tests parse it with Triton's own
model_config.proto (tritonclient) and with a real tritonserver.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .bundle import INPUT_NAME, MANIFEST_FILE, MAP_OUTPUT, SCORE_OUTPUT, Bundle, BundleError, load_bundle

CONFIG_FILE = "config.pbtxt"
DATA_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32"}
TRITON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class TritonExportError(ValueError):
    """A bundle or an option that cannot become a Triton model; the message says which and why."""


@dataclass(frozen=True)
class TritonOptions:
    """How Triton should serve the models: the same vocabulary as the diffad service's settings."""

    max_batch_size: int = 8
    max_queue_delay_us: int = 5000        # DIFFAD_MAX_QUEUE_DELAY_MS, in microseconds
    max_queue_size: int = 256             # requests queued per model before Triton refuses (UNAVAILABLE)
    instances: int = 1                    # model instances per device
    kind: str = "gpu"                     # gpu (KIND_GPU) or cpu (KIND_CPU)
    keep_versions: int = 2                # versions Triton keeps loaded (the newest N): room for a rollout
    tensorrt: bool = False                # serve the bundles' TensorRT engines (platform tensorrt_plan)
    tensorrt_version: str | None = None   # only engines built with this TensorRT (the Triton image's)

    def __post_init__(self):
        for name in ("max_batch_size", "instances", "keep_versions", "max_queue_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise TritonExportError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_queue_delay_us, int) or self.max_queue_delay_us < 0:
            raise TritonExportError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us!r}")
        if self.kind not in ("gpu", "cpu"):
            raise TritonExportError(f"kind must be gpu or cpu, got {self.kind!r}")
        if self.tensorrt and self.kind != "gpu":
            raise TritonExportError("TensorRT engines run on GPUs only: use kind gpu")


# --- config.pbtxt ---------------------------------------------------------------------------------
def _quote(text: str) -> str:
    """A protobuf text-format string literal (C-style escapes; non-ASCII as octal UTF-8 bytes)."""
    out = []
    for byte in str(text).encode():
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _number(value: float) -> str:
    if not math.isfinite(value):
        raise TritonExportError(f"a non-finite number cannot go into {CONFIG_FILE}: {value!r}")
    return repr(float(value))


def calibration_parameters(bundle: Bundle) -> dict[str, str]:
    """What a client of Triton needs beside the tensors: how to feed the model and read its score."""
    spec = bundle.input
    params = {
        "diffad_bundle_version": bundle.version,
        "input_size": str(spec.size),
        "input_channels": str(spec.channels),
        "input_color": str(bundle.manifest["input"].get("color", "L" if spec.channels == 1 else "RGB")),
        "input_range": f"{spec.range[0]:g}..{spec.range[1]:g}",
        "score_top_k": str(bundle.top_k),
        "threshold": "" if bundle.threshold is None else _number(bundle.threshold),
    }
    norm = bundle.normalization
    if norm is not None:
        params.update({"score_min": _number(norm.score_min), "score_max": _number(norm.score_max),
                       "score_normalization": norm.formula})
    return params


def model_config(bundle: Bundle, options: TritonOptions, engine_files: dict[str, str] | None = None) -> str:
    """config.pbtxt for the bundle: ONNX Runtime, or TensorRT when engine_files maps compute capability
    ("9.0") to an engine file name."""
    spec, size = bundle.input, bundle.input.size
    kind = "KIND_GPU" if options.kind == "gpu" else "KIND_CPU"
    lines = [f"name: {_quote(bundle.name)}"]
    if engine_files:
        lines.append('platform: "tensorrt_plan"')
    else:
        lines.append('backend: "onnxruntime"')
    lines += [
        f"max_batch_size: {options.max_batch_size}",
        f"version_policy: {{ latest: {{ num_versions: {options.keep_versions} }} }}",
        "input [",
        f"  {{ name: {_quote(INPUT_NAME)} data_type: {DATA_TYPES[spec.dtype]} format: FORMAT_NCHW "
        f"dims: [ {spec.channels}, {size}, {size} ] }}",
        "]",
        "output [",
        f"  {{ name: {_quote(MAP_OUTPUT)} data_type: TYPE_FP32 dims: [ 1, {size}, {size} ] }},",
        f"  {{ name: {_quote(SCORE_OUTPUT)} data_type: TYPE_FP32 dims: [ 1 ] reshape: {{ shape: [ ] }} }}",
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
        f"  default_queue_policy {{ max_queue_size: {options.max_queue_size} }}",
        "}",
        f"instance_group [ {{ count: {options.instances} kind: {kind} }} ]",
    ]
    if engine_files:
        lines.append("cc_model_filenames [")
        lines += [f"  {{ key: {_quote(cc)} value: {_quote(name)} }}," for cc, name in sorted(engine_files.items())]
        lines[-1] = lines[-1].rstrip(",")
        lines.append("]")
    for key, value in calibration_parameters(bundle).items():
        lines.append(f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}")
    return "\n".join(lines) + "\n"


def choose_engines(bundle: Bundle, options: TritonOptions) -> dict[str, str]:
    """compute capability -> engine file, one per capability (fp16 first), for --tensorrt."""
    chosen: dict[str, dict] = {}
    for entry in bundle.engines:
        cc = entry.get("compute_capability")
        if cc is None or (options.tensorrt_version and entry.get("tensorrt_version") != options.tensorrt_version):
            continue
        if int(entry.get("min_batch", 1)) != 1:
            continue  # Triton sends any batch from 1 up: an engine whose profile starts higher cannot take it
        if int(entry["max_batch"]) < options.max_batch_size:
            continue
        best = chosen.get(cc)
        if best is None or (best["precision"] != "fp16" and entry["precision"] == "fp16"):
            chosen[cc] = entry
    if not chosen:
        wanted = f" built with TensorRT {options.tensorrt_version}" if options.tensorrt_version else ""
        raise TritonExportError(
            f"bundle {bundle.path} has no TensorRT engine{wanted} with batch profile 1..{options.max_batch_size} "
            "and a known compute capability; build one on the target GPU with `diffad export RUN_DIR --out "
            f"BUNDLE_DIR --tensorrt --min-batch 1 --max-batch {options.max_batch_size}`, or export for "
            "ONNX Runtime (without --tensorrt)")
    return {cc: entry["file"] for cc, entry in chosen.items()}


# --- the repository -------------------------------------------------------------------------------
def _version_dirs(model_dir: Path) -> list[tuple[int, Path]]:
    """The numbered version folders of a model folder that hold a bundle."""
    if not model_dir.is_dir():
        return []
    return [(int(child.name), child) for child in model_dir.iterdir()
            if child.is_dir() and child.name.isdigit() and (child / MANIFEST_FILE).is_file()]


def existing_versions(model_dir: Path) -> dict[int, str]:
    """version number -> the bundle version (ONNX hash prefix) held there, for a model folder."""
    found = {}
    for number, folder in _version_dirs(model_dir):
        try:
            found[number] = load_bundle(folder, verify=False).version
        except BundleError:
            found[number] = ""  # unreadable: keep its number taken, never match it
    return found


def latest_version_dir(model_dir: Path) -> Path | None:
    """The highest-numbered version folder that holds a bundle, or None."""
    versions = _version_dirs(model_dir)
    return max(versions)[1] if versions else None


def resolve_bundle_dir(path: str | Path) -> Path:
    """A bundle folder as given; a Triton model folder (REPO/<name>, with config.pbtxt): its newest version."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file() and (path / CONFIG_FILE).is_file():
        newest = latest_version_dir(path)
        if newest is not None:
            return newest
    return path


def refuse_other_methods(bundle) -> None:
    if bundle.method != "diffusionad":
        raise TritonExportError(f"bundle {bundle.path} is a {bundle.method} bundle: its Triton export is not built "
                                "yet; serve it with `diffad serve` (ONNX Runtime)")


def export_model(bundle_dir: str | Path, repo: str | Path, options: TritonOptions = TritonOptions()) -> dict:
    """Add one bundle to the repository (a new version, or the one that already holds it); returns what
    was done."""
    bundle = load_bundle(bundle_dir)  # verified: a corrupted bundle must not reach a fleet
    refuse_other_methods(bundle)
    if not TRITON_NAME.fullmatch(bundle.name):
        raise TritonExportError(f"model name {bundle.name!r} is not a Triton model name (letters, digits, "
                                "'_', '.', '-'): export the bundle again with --name")
    if bundle.input.dtype not in DATA_TYPES:
        raise TritonExportError(f"bundle {bundle.path}: input dtype {bundle.input.dtype!r} is not supported")
    engine_files = choose_engines(bundle, options) if options.tensorrt else None
    model_dir = Path(repo) / bundle.name
    versions = existing_versions(model_dir)
    same = [number for number, held in versions.items() if held == bundle.version]
    number = same[0] if same else max(versions, default=0) + 1
    version_dir = model_dir / str(number)
    if not same:
        staging = model_dir / f".{number}.tmp"  # Triton skips names that are not numbers: no half version
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(bundle.path, staging, ignore=shutil.ignore_patterns("*.tmp"))
        load_bundle(staging)  # the copy is whole
        os.replace(staging, version_dir)
    newest = number >= max(versions, default=0)
    if newest:  # config.pbtxt follows the newest version
        text = model_config(bundle, options, engine_files)
        tmp = model_dir / (CONFIG_FILE + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, model_dir / CONFIG_FILE)
    return {"model": bundle.name, "version": number, "bundle_version": bundle.version,
            "new_version": not same, "config_updated": newest, "path": str(version_dir),
            "platform": "tensorrt_plan" if engine_files else "onnxruntime",
            "engines": engine_files or {}}


def export_repository(bundle_dirs: list[str | Path], repo: str | Path,
                      options: TritonOptions = TritonOptions()) -> list[dict]:
    """Every bundle into the repository; names must be unique among them."""
    names: dict[str, Path] = {}
    for path in bundle_dirs:
        bundle = load_bundle(path, verify=False)
        refuse_other_methods(bundle)  # before the repository is made: nothing is written
        if bundle.name in names:
            raise TritonExportError(f"two bundles are named {bundle.name!r} ({names[bundle.name]} and {path}): "
                                    "export one of them again with --name")
        names[bundle.name] = Path(path)
    Path(repo).mkdir(parents=True, exist_ok=True)
    return [export_model(path, repo, options) for path in bundle_dirs]

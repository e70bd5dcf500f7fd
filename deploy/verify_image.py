"""Checks an installed serving environment: run by the Dockerfile right after `pip install`, and by
`make deploy-check` on a virtual environment built the same way outside Docker.

    python deploy/verify_image.py --backend onnxruntime   # the cpu image
    python deploy/verify_image.py --backend tensorrt      # the gpu image (no GPU needed to check it)

Fails (exit 1, one line per problem) when PyTorch or another training-only package is installed, when a
serving module cannot be imported without it, when `pip check` finds broken requirements, or when the
backend's packages are missing: for the gpu image, onnxruntime must be the GPU build (the CPU build of the
`serve` extra installs into the same folder and would hide it) and tensorrt and cuda-python must be there.
Standard library only, apart from the packages it checks.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import pkgutil
import subprocess
import sys

# Distributions that belong to training / export only; none may reach a serving image.
TRAINING_ONLY = ("torch", "torchvision", "torchaudio", "triton", "safetensors", "scikit-learn", "scipy",
                 "scikit-image", "onnxscript")


def installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def check_no_training_packages() -> list[str]:
    return [f"training-only package installed: {name}=={importlib.metadata.version(name)}"
            for name in TRAINING_ONLY if installed(name)]


def check_serving_imports() -> list[str]:
    """Import every module of diffad.service and diffad.export.bundle: none may need torch.

    A module whose name says it is the optional torch backend may fail for want of torch, nothing else.
    """
    problems = []
    modules = ["diffad", "diffad.cli", "diffad.export.bundle", "diffad.export.tensorrt_engine"]
    try:
        service = importlib.import_module("diffad.service")
    except Exception as e:  # noqa: BLE001 - report whatever breaks the import
        return [f"cannot import diffad.service: {e!r}"]
    modules += [m.name for m in pkgutil.walk_packages(service.__path__, "diffad.service.")]
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == "torch" and "torch" in name.rsplit(".", 1)[-1]:
                continue  # the optional torch backend, imported only when asked for
            problems.append(f"cannot import {name}: {e!r}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"cannot import {name}: {e!r}")
    if "torch" in sys.modules:
        problems.append("importing the serving modules imported torch")
    return problems


def check_serve_command() -> list[str]:
    """`diffad serve` with no model must stop at "no model to serve" (exit 2), not on a missing torch.

    Importing the modules is not enough: the command line's main() runs code of its own before the verb.
    """
    import os
    import tempfile

    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFAD_")}
    with tempfile.TemporaryDirectory() as empty:  # no .env settings file there
        result = subprocess.run([sys.executable, "-m", "diffad.cli", "serve"], capture_output=True, text=True,
                                env=env, cwd=empty, timeout=120)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 2 or "no model to serve" not in output:
        return [f"`diffad serve` without a model should exit 2 with 'no model to serve'; it exited "
                f"{result.returncode}: {output[-800:]}"]
    return []


def check_pip() -> list[str]:
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    if result.returncode != 0:
        return ["pip check: " + line for line in (result.stdout + result.stderr).strip().splitlines()]
    return []


def check_backend(backend: str) -> list[str]:
    problems = []
    try:
        import onnxruntime
    except ImportError as e:
        return [f"onnxruntime does not import: {e!r}"]
    providers = onnxruntime.get_available_providers()
    if "CPUExecutionProvider" not in providers:
        problems.append(f"onnxruntime has no CPUExecutionProvider: {providers}")
    if backend == "tensorrt":
        if "CUDAExecutionProvider" not in providers:
            problems.append(f"onnxruntime is not the GPU build (providers {providers}): the CPU onnxruntime "
                            "package overwrote onnxruntime-gpu")
        if installed("onnxruntime"):
            problems.append("both onnxruntime and onnxruntime-gpu are installed; they share one folder")
        if importlib.util.find_spec("tensorrt") is None:
            problems.append("the tensorrt Python package is missing")
        if importlib.util.find_spec("cuda") is None:
            problems.append("cuda-python is missing")
    return problems + check_gateway()


def check_gateway() -> list[str]:
    """Both images can be the gateway (DIFFAD_BACKEND=triton): Triton's HTTP and gRPC clients import."""
    problems = []
    for name in ("tritonclient.http", "tritonclient.grpc"):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - report whatever breaks the import
            problems.append(f"cannot import {name} (the triton extra): {e!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("onnxruntime", "tensorrt"), required=True)
    args = parser.parse_args(argv)
    problems = (check_no_training_packages() + check_serving_imports() + check_serve_command() + check_pip()
                + check_backend(args.backend))
    for problem in problems:
        print(f"verify_image: {problem}", file=sys.stderr)
    if problems:
        return 1
    import onnxruntime

    print(f"verify_image: ok ({args.backend}; python {sys.version.split()[0]}, onnxruntime "
          f"{onnxruntime.__version__} {onnxruntime.get_available_providers()}, no torch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

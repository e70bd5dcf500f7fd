"""A local tritonserver for tests and benchmarks: PyPI's nvidia-pytriton wheel over a twin repository.

That wheel carries a working tritonserver (Linux x86-64) with the Python backend only, not the
onnxruntime backend that `diffad export-triton` configures. `twin_repository` copies an exported
repository and swaps each model's backend for triton_twin/model.py, which runs the same model.onnx with
ONNX Runtime, so the config, names, shapes, batching and queue policy stay those of the export.
`TritonServer` starts the binary on 127.0.0.1 with the Python backend set up in a folder of its own.

    python -m diffad.benchmarks.local_triton triton-repo --twin /tmp/twin   # serves until Ctrl-C
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..export.triton import CONFIG_FILE
from .load import free_port

TWIN_MODEL = Path(__file__).parent / "triton_twin" / "model.py"
PYTRITON = "nvidia-pytriton==0.7.0"


def find_tritonserver() -> tuple[dict | None, str]:
    """Where the wheel's tritonserver, its libraries and this Python's backend stub are, or why not."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None, f"the nvidia-pytriton wheel's tritonserver is for Linux x86-64, this is {sys.platform} " \
                     f"{platform.machine()}"
    spec = importlib.util.find_spec("pytriton")  # found, not imported: only the binary is used
    if spec is None or not spec.submodule_search_locations:
        return None, "the nvidia-pytriton wheel is not installed (`make install` adds it: pip install --no-deps " \
                     f"{PYTRITON})"
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    libs = root.parents[1] / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = {"binary": root / "bin" / "tritonserver", "libs": libs,
             "backend": root / "backends" / "python",
             "stub": root / "python_backend_stubs" / version / "triton_python_backend_stub"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        return None, f"the nvidia-pytriton wheel lacks {', '.join(missing)}"
    ldd = subprocess.run(["ldd", str(paths["stub"])], capture_output=True, text=True,
                         env={**os.environ, "LD_LIBRARY_PATH": str(libs)})
    unresolved = [line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line]
    if ldd.returncode != 0 or unresolved:
        return None, f"Triton's Python {version} backend stub cannot load here: {', '.join(unresolved) or ldd.stderr}" \
                     f" not found (it needs the system's libpython{version}.so)"
    return paths, ""


class TritonServer:
    """tritonserver on 127.0.0.1 over a repository, its Python backend set up in a folder of its own."""

    def __init__(self, paths: dict, repo: Path, workdir: Path, *extra_args: str):
        self.paths, self.repo, self.extra_args = paths, repo, extra_args
        self.backends = workdir / "backends"
        python = self.backends / "python"
        python.mkdir(parents=True, exist_ok=True)
        for item in paths["backend"].iterdir():
            if not (python / item.name).exists():
                (python / item.name).symlink_to(item)
        if not (python / "triton_python_backend_stub").exists():
            (python / "triton_python_backend_stub").symlink_to(paths["stub"])
        self.log_path = workdir / "tritonserver.log"
        self.process = None
        self.http_port = self.grpc_port = self.metrics_port = None

    def start(self, timeout_s: float = 90.0, same_ports: bool = False) -> None:
        if not same_ports:
            self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        env = {**os.environ, "LD_LIBRARY_PATH": str(self.paths["libs"]),
               "TWIN_PYTHONPATH": os.pathsep.join([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])}
        self.process = subprocess.Popen(
            [str(self.paths["binary"]), f"--model-repository={self.repo}", f"--backend-directory={self.backends}",
             f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
             "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
             "--exit-timeout-secs=5", *self.extra_args],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"tritonserver not ready in {timeout_s:g} s:\n{self.log_tail()}")

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def post(self, path: str) -> tuple[int, str]:
        request = urllib.request.Request(self.http_url + path, data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("nv_inference_") and "{" in line:
                name, rest = line.split("{", 1)
                labels, value = rest.rsplit("} ", 1)
                values[f"{name}{{{labels}}}"] = float(value)
        return values

    def log_tail(self, lines: int = 40) -> str:
        """The log's last `lines` lines, without the GPU-monitoring warnings of a GPU-less machine."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        kept = [line for line in text.splitlines() if "nvml" not in line.lower() and "dcgm" not in line.lower()]
        return "\n".join(kept[-lines:])




def twin_repository(production_repo: Path, out: Path, delays: dict[str, float] | None = None) -> Path:
    """The exported repository with each model's backend swapped for the Python twin (same model.onnx)."""
    shutil.copytree(production_repo, out)
    for model_dir in out.iterdir():
        config = (model_dir / CONFIG_FILE).read_text()
        if 'backend: "onnxruntime"' not in config:
            raise ValueError(f"{model_dir / CONFIG_FILE} is not an onnxruntime model: the twin replaces only those")
        config = config.replace('backend: "onnxruntime"', 'backend: "python"')
        delay = (delays or {}).get(model_dir.name)
        if delay:
            config += f'parameters {{ key: "twin_delay_s" value: {{ string_value: "{delay}" }} }}\n'
        (model_dir / CONFIG_FILE).write_text(config)
        for version in model_dir.iterdir():
            if version.is_dir():
                shutil.copy(TWIN_MODEL, version / "model.py")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repository", type=Path, help="a repository written by `diffad export-triton`")
    parser.add_argument("--twin", type=Path, help="where to write the twin repository (default: a temporary folder)")
    args = parser.parse_args()
    paths, why = find_tritonserver()
    if paths is None:
        raise SystemExit(why)
    work = Path(tempfile.mkdtemp(prefix="diffad-triton-"))
    twin = twin_repository(args.repository, args.twin or work / "repository")
    server = TritonServer(paths, twin, work)
    server.start()
    print(f"tritonserver ready: {server.http_url} (gRPC 127.0.0.1:{server.grpc_port}, metrics "
          f"127.0.0.1:{server.metrics_port}); log {server.log_path}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()

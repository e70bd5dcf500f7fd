"""The package as users install it: a wheel built from the tree, in a fresh virtual environment.

The top-level folders (models/, training/, evaluation/, export/, service/, bench/) are mapped onto one
namespace, diffad.*, by pyproject.toml. An editable install resolves them through setuptools' finder; a wheel
must hold them under diffad/ and nothing else at its top level. Built offline (no build isolation: the
setuptools of this environment), installed without dependencies into a virtual environment that borrows this
one's packages through a .pth file, then `diffad --help` and `diffad serve` on a tiny bundle, one inspection.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
from test_deploy import free_port, multipart_png, request_url, tiny_bundle  # noqa: E402, F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tree's package folders (a build in place would leave build/ behind)."""
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    wheels = list(out.glob("diffad-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; its dependencies come from this environment."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    purelib = Path(subprocess.run([str(root / "bin" / "python"), "-c", "import sysconfig; "
                                   "print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    # Plain path lines: this environment's packages become importable, its .pth hooks (the editable
    # finder of the tree) do not run.
    site_dirs = [p for p in sys.path if Path(p).name == "site-packages"] or [sysconfig.get_paths()["purelib"]]
    (purelib / "dependencies.pth").write_text("".join(f"{p}\n" for p in site_dirs))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install", "--quiet",
                    "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return root


def test_wheel_holds_one_namespace_and_every_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"diffad"}, f"the wheel installs top-level {sorted(tops - {'diffad'})}"
    for package, folder in PACKAGE_DIRS.items():
        sources = {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).glob("*.py")}
        packaged = {n.removeprefix(package.replace(".", "/") + "/") for n in names
                    if n.startswith(package.replace(".", "/") + "/") and n.count("/") == package.count(".") + 1}
        assert sources <= packaged, f"{package} lacks {sorted(sources - packaged)}"
    assert "diffad/service/static/index.html" in names
    assert not any("results/" in n for n in names), "benchmark results are not part of the package"


def test_installed_wheel_runs_the_cli_from_site_packages(venv):
    python = venv / "bin" / "python"
    found = subprocess.run([str(python), "-c", "import diffad.service.app, diffad.training.trainer as t, "
                            "diffad.benchmarks.quality as q; print(diffad.service.app.__file__, t.__file__, "
                            "q.__file__)"], capture_output=True, text=True, cwd=venv)
    assert found.returncode == 0, found.stderr
    where = found.stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), f"imported from outside the environment: {where}"
    result = subprocess.run([str(venv / "bin" / "diffad"), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("train", "evaluate", "export", "serve", "bench"):
        assert command in result.stdout


def test_installed_wheel_serves_an_inspection(venv, tiny_bundle, tmp_path):  # noqa: F811 (the fixture)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFAD_")}
    env.update({"DIFFAD_HOST": "127.0.0.1", "DIFFAD_PORT": str(port), "DIFFAD_BACKEND": "onnxruntime",
                "DIFFAD_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(venv / "bin" / "diffad"), "serve", str(tiny_bundle)], env=env,
                                   cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.monotonic() + 180, None
        while time.monotonic() < deadline and process.poll() is None and status != 200:
            try:
                status, _ = request_url("GET", f"{base}/readyz", timeout=5)
            except OSError:
                status = None
            if status != 200:
                time.sleep(0.5)
        assert status == 200, f"not ready (exit {process.poll()}):\n{log_path.read_text()[-4000:]}"
        body, content_type = multipart_png()
        status, answer = request_url("POST", f"{base}/inspect", body, {"Content-Type": content_type})
        assert status == 200, answer
        result = json.loads(answer)
        assert result["model"] == "tiny" and isinstance(result["is_anomalous"], bool)
        assert {"image_score", "anomaly_map", "timings_ms"} <= set(result)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

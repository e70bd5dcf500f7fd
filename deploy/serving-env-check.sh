#!/usr/bin/env bash
# The cpu image's Python environment, built outside Docker exactly as the Dockerfile's cpu-build stage does,
# then checked and served (run by .ci/run and `make deploy-check`; no Docker needed):
#
#   1. copy the files the Dockerfile copies (pyproject.toml, README.md, the package's folders, deploy/requirements/,
#      deploy/verify_image.py) into a scratch folder, as the build context would hold them;
#   2. a fresh virtual environment, then the Dockerfile's own command:
#      pip install -c deploy/requirements/serve-cpu.txt ".[serve,triton,tracing]"   (a wheel install, not editable);
#   3. deploy/verify_image.py --backend onnxruntime: no torch or other training package, every serving
#      module imports, pip check passes;
#   4. tests/test_deploy.py's end-to-end test with that environment's `diffad`: deploy/entrypoint.sh starts
#      it on a tiny bundle, /readyz, POST /inspect, /metrics, SIGTERM; the serving process must not load torch.
#
# Needs network access to PyPI (as the image build does) and the project's .venv (to make the tiny bundle).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV_PYTHON=${VENV_PYTHON:-.venv/bin/python}

work=$(mktemp -d "${TMPDIR:-/tmp}/diffad-serving-env.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "serving-env-check: build context and virtual environment in $work ($("$PYTHON" --version 2>&1))"
mkdir -p "$work/src/deploy"
cp pyproject.toml README.md "$work/src/"
# The package's folders, as pyproject.toml maps them (diffad/, models/, ..., bench/ without its results).
folders=$(sed -n '/^\[tool.setuptools.package-dir\]/,/^\[/s/^"[^"]*" = "\([^"]*\)"$/\1/p' pyproject.toml)
for folder in $folders; do
    cp -r "$folder" "$work/src/$folder"
done
rm -rf "$work/src/bench/results"
cp -r deploy/requirements "$work/src/deploy/requirements"
cp deploy/verify_image.py "$work/src/deploy/verify_image.py"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +

"$PYTHON" -m venv "$work/venv"
(
    cd "$work/src"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$work/venv/bin/pip" install --quiet \
        -c deploy/requirements/serve-cpu.txt ".[serve,triton,tracing]"
    "$work/venv/bin/python" deploy/verify_image.py --backend onnxruntime
)

DIFFAD_DEPLOY_SERVE_BIN="$work/venv/bin/diffad" "$VENV_PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_deploy.py -k test_entrypoint_serves_a_bundle_and_stops_on_sigterm -rs \
    | tee "$work/pytest.log"
if ! grep -q "1 passed" "$work/pytest.log"; then
    echo "serving-env-check: the end-to-end test did not pass (skipped?)" >&2
    exit 1
fi
echo "serving-env-check: ok"

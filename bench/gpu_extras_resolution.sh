#!/usr/bin/env bash
# Does `pip install -e ".[serve,gpu-cu12]"` (and gpu-cu13) resolve? Run from the repository root:
#
#   bash bench/gpu_extras_resolution.sh [OUT_DIR]      (default bench/results/gpu_extras)
#
# Two resolvers, each for both extras:
#   - pip's dry run, for the interpreter that runs it (`pip install --dry-run --report`): pip must build the metadata of tensorrt-cuXX-libs,
#     a stub on PyPI that downloads the real wheel from https://pypi.nvidia.com to read it; where that index
#     is unreachable, pip stops there, after it has chosen every other version.
#   - uv (`uv pip compile`), for Python 3.12 on x86_64 Linux (the GPU image's platform): reads the stubs' static metadata (TensorRT 11 stubs have it) without a download.
# It writes each resolver's output per extra plus summary.txt: the versions chosen for the GPU packages.
set -uo pipefail
out=${1:-bench/results/gpu_extras}
mkdir -p "$out"
pip=${PIP:-.venv/bin/pip}
uv=${UV:-.venv/bin/uv}
{
    echo "date: $(date -u +%FT%TZ)"
    echo "pip: $($pip --version)"
    echo "uv: $($uv --version)"
} > "$out/summary.txt"
for extra in gpu-cu12 gpu-cu13; do
    $pip install --dry-run --ignore-installed --report /tmp/gpu-extras-$extra.json ".[serve,$extra]" \
        > "$out/$extra.pip.log" 2>&1
    pip_rc=$?
    grep -v "WARNING: Location" "$out/$extra.pip.log" > "$out/$extra.pip.log.tmp" && mv "$out/$extra.pip.log.tmp" "$out/$extra.pip.log"
    $uv pip compile pyproject.toml --extra serve --extra "$extra" --python-version 3.12 \
        --python-platform x86_64-manylinux_2_28 --no-header --annotation-style line \
        -o "$out/$extra.uv.txt" > "$out/$extra.uv.log" 2>&1
    uv_rc=$?
    {
        echo
        echo "== $extra"
        echo "pip dry run: rc $pip_rc; $(grep -m1 -o 'Would install.*\|metadata-generation-failed' "$out/$extra.pip.log" | head -c 300)"
        grep -m1 -A3 "The installation of" "$out/$extra.pip.log" | sed 's/^ */    /'
        echo "uv pip compile: rc $uv_rc"
        grep -E "^(tensorrt|onnxruntime|cuda|numpy)" "$out/$extra.uv.txt" 2>/dev/null | sed 's/ *#.*//; s/^/    /'
    } >> "$out/summary.txt"
done
cat "$out/summary.txt"

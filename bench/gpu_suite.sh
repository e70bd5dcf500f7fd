#!/usr/bin/env bash
# The GPU measurements of issue 18, as one script for a short loan of a GPU machine (see DEVELOPERS.md):
#   1. throughput of the small and paper presets at batch 1, 8, 32: fp32, fp16 eager, fp16 CUDA graph,
#      fp16 compiled + CUDA graph, with the GPU's measured matmul peak and the fraction of it reached;
#   2. the service end to end on the GPU with the torch backend (fp16 networks, CUDA graphs), client on the
#      same host, for a small bundle that this script trains and exports itself;
#   3. with CATEGORY (an MVTec-layout folder, e.g. ../shared/datasets/dagm_class1): a small model trained on it
#      for STEPS steps, its test set through fp32 and fp16 (map and score differences, both sets of metrics).
# Usage: bash bench/gpu_suite.sh OUT_DIR [CATEGORY [STEPS]]
#        (results as JSON in OUT_DIR; each step skipped if its file exists)
set -euo pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUT_DIR [CATEGORY [STEPS]]}
category=${2:-}
steps=${3:-1000}
mkdir -p "$out"
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/nvidia-smi.csv" || true

[ -f "$out/throughput.json" ] || "$py" -m diffad.benchmarks.throughput torch --device cuda --preset small paper \
    --precision fp32 fp16 --batch 1 8 32 --seconds 2 --compile --json "$out/throughput.json"

if [ ! -f "$out/load_torch_cuda.json" ]; then
    work=$(mktemp -d)
    "$py" -m diffad.training.demo_data "$work/data/weave" --samples "$work/data"
    "$py" -m diffad.cli train "$work/data/weave" --preset small --out "$work/run" --max-steps 100 --device cuda
    "$py" -m diffad.cli evaluate "$work/run" "$work/data/weave"
    "$py" -m diffad.cli export "$work/run" --out "$work/bundle"
    "$py" -m diffad.cli bench load "$work/bundle" --backend torch --max-batch-size 32 --concurrency 64 \
        --seconds 10 --json "$out/load_torch_cuda.json"
fi

if [ -n "$category" ] && [ ! -f "$out/precision_fp16_$(basename "$category").json" ]; then
    run="${TMPDIR:-/tmp}/diffad_gpu_suite_run_$(basename "$category")"  # models stay out of the results
    [ -f "$run/model.safetensors" ] || "$py" -m diffad.cli train "$category" --preset small --out "$run" \
        --max-steps "$steps" --device cuda
    "$py" -m diffad.benchmarks.precision "$run" "$category" --device cuda --precision fp16 \
        --json "$out/precision_fp16_$(basename "$category").json"
fi

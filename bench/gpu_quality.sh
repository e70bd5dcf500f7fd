#!/usr/bin/env bash
# The quality tables of issues 13 and 14 on one GPU, for a short loan of a GPU machine (DEVELOPERS.md):
# every run of `diffad bench quality` at once, each in its own process, with the step budgets that the CPU
# reaches in its time budget (training is device-independent with step budgets, so the figures are the
# CPU benchmark's; only the time differs):
#   1. DeCo-Diff, one model per category (128 px), seeds 0-2: STEPS_DECODIFF_<category> steps each;
#   2. DeCo-Diff, one multi-class model for the three categories (128 px, 3 channels), seeds 0-2, for the
#      per-category runs' total time: STEPS_MULTICLASS steps;
#   3. DiffusionAD as in the README's table (tire at 256 px), seeds 0-2, with D3AD's two modes evaluated on
#      the same models (--d3ad): STEPS_DIFFUSIONAD_<category> steps, the CPU runs' mean;
#   4. two longer runs, seed 0, to see whether the budget is what limits: DeCo-Diff on dagm_class1 and
#      DiffusionAD on magnetic_tile, each LONG times its budget.
# Everything stops at DEADLINE seconds; what finished by then is in OUT/results.tgz (records, and for every
# run, finished or not, its logs: train_log.jsonl, validation_log.jsonl, eval*.json; no weights), packed
# every 20 s so that a command killed at its limit still returns it. A rerun skips finished records.
# Usage: bash bench/gpu_quality.sh DATA128 DATA256 OUT   (DATA*: folders of categories copied at 128 and
#        256 px by bench/resize_category.py; OUT: where results.tgz and the machine's details go)
set -uo pipefail
data128=${1:?usage: bash bench/gpu_quality.sh DATA128 DATA256 OUT}
data256=${2:?usage: bash bench/gpu_quality.sh DATA128 DATA256 OUT}
out=${3:?usage: bash bench/gpu_quality.sh DATA128 DATA256 OUT}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
deadline=${DEADLINE:-500}
long=${LONG:-4}
seeds=${SEEDS:-0 1 2}
concurrency=${CONCURRENCY:-6}
work=${WORK:-/tmp/diffad_gpu_quality}
# CPU step counts (2-core AMD EPYC, native bf16; README): DeCo-Diff's from a 30-minute dagm_class1 run (3210)
# and 200-step rate runs of the others (100 steps plus one validation: magnetic_tile 66.4 s, mvtec3d_tire
# 66.7 s, the multi-class model 99.7 s, as it validates three categories: 5400 steps in 90 min); DiffusionAD's the
# means of the README table's 30-minute runs.
declare -A steps_decodiff=([dagm_class1]=${STEPS_DECODIFF_dagm_class1:-3210}
                           [magnetic_tile]=${STEPS_DECODIFF_magnetic_tile:-2710}
                           [mvtec3d_tire]=${STEPS_DECODIFF_mvtec3d_tire:-2700})
steps_multiclass=${STEPS_MULTICLASS:-5400}
declare -A steps_diffusionad=([dagm_class1]=${STEPS_DIFFUSIONAD_dagm_class1:-1575}
                              [magnetic_tile]=${STEPS_DIFFUSIONAD_magnetic_tile:-1653}
                              [mvtec3d_tire]=${STEPS_DIFFUSIONAD_mvtec3d_tire:-1300})
categories=(dagm_class1 magnetic_tile mvtec3d_tire)

mkdir -p "$out" "$work/results" "$work/logs"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1  # one core per process: many share the CPU
started=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/nvidia-smi.csv" 2>&1
"$py" -c "import json; from diffad.benchmarks.throughput import machine; print(json.dumps(machine(), indent=2))" \
    > "$out/machine.json"
(nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 > "$out/gpu_utilization.csv" 2>&1 &)

pack() {  # everything but the weights, atomically
    (cd "$work" && find results logs runs -name '*.json*' -o -name '*.log' 2>/dev/null) > "$work/packed.txt"
    tar -czf "$out/.results.tgz" -C "$work" -T "$work/packed.txt" 2>/dev/null
    mv "$out/.results.tgz" "$out/results.tgz"
}

# The runs wait in a queue, in this order, and CONCURRENCY of them share the GPU at a time: so they finish one
# after another (all at once, none would finish if the deadline came first). Seed 0 of everything, then seed 1,
# seed 2, then the long runs.
names=() commands=()
run() {  # run NAME ARGS...: queue one bench quality process
    names+=("$1"); shift
    commands+=("$(printf '%q ' "$py" -m diffad.cli bench quality "$@" --device "$device" --max-minutes 600 \
        --runs-dir "$work/runs")")
}
for seed in $seeds; do
    run "multiclass_seed$seed" "$data128/dagm_class1" "$data128/magnetic_tile" "$data128/mvtec3d_tire" \
        --method decodiff --multi-class --seeds "$seed" --max-steps "$steps_multiclass" \
        --out-dir "$work/results/multiclass"
    for c in "${categories[@]}"; do
        run "decodiff_${c}_seed$seed" "$data128/$c" --method decodiff --seeds "$seed" \
            --max-steps "${steps_decodiff[$c]}" --out-dir "$work/results/decodiff"
        size=(); data=$data128
        [ "$c" = mvtec3d_tire ] && size=(--image-size 256) && data=$data256
        run "diffusionad_${c}_seed$seed" "$data/$c" "${size[@]}" --d3ad --seeds "$seed" \
            --max-steps "${steps_diffusionad[$c]}" --out-dir "$work/results/diffusionad"
    done
done
run long_decodiff_dagm_class1 "$data128/dagm_class1" --method decodiff --seeds 0 --setting "long${long}x" \
    --max-steps $((long * steps_decodiff[dagm_class1])) --out-dir "$work/results/long"
run long_diffusionad_magnetic_tile "$data128/magnetic_tile" --seeds 0 --setting "long${long}x" \
    --max-steps $((long * steps_diffusionad[magnetic_tile])) --out-dir "$work/results/long"

log() { echo "$(date -u +%T) $(($(date +%s) - started)) s: $*" >> "$work/logs/launcher.log"; }
declare -A running=()  # pid -> queue index
next=0 last_pack=0
while :; do
    for pid in "${!running[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid"; log "${names[${running[$pid]}]} ended (exit $?)"; unset "running[$pid]"
        fi
    done
    if [ $(($(date +%s) - started)) -ge "$deadline" ]; then
        stopped=(); for pid in "${!running[@]}"; do stopped+=("${names[${running[$pid]}]}"); done
        log "deadline: stopping ${stopped[*]}; not started: ${names[*]:$next}"
        kill "${!running[@]}" 2>/dev/null
        sleep 3
        break
    fi
    while [ "${#running[@]}" -lt "$concurrency" ] && [ "$next" -lt "${#names[@]}" ]; do
        # the & inside eval: $! is then the python process itself, which the deadline can stop
        eval "${commands[$next]} --json $work/results/${names[$next]}.summary.json > /dev/null \
            2> $work/logs/${names[$next]}.log &"
        running[$!]=$next; log "${names[$next]} started"; next=$((next + 1))
    done
    [ "${#running[@]}" = 0 ] && break
    if [ $(($(date +%s) - last_pack)) -ge 20 ]; then pack; last_pack=$(date +%s); fi
    sleep 2
done
pack
cat "$work/logs/launcher.log"

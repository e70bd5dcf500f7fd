#!/bin/sh
# Start the diffad inspection service (the image's ENTRYPOINT; it runs outside Docker too).
#
#   1. find the model bundles: DIFFAD_MODELS (comma-separated folders) if set, else DIFFAD_MODELS_DIR
#      (default /models) when it is itself a bundle, else every folder in it that holds a bundle.json, or
#      that is a Triton model folder (config.pbtxt and numbered versions, as `diffad export-triton` writes:
#      the service takes its newest version, and with DIFFAD_BACKEND=triton asks Triton for that version);
#   2. build, for the GPU of this machine, any TensorRT engine those bundles lack, into DIFFAD_ENGINE_CACHE
#      (`diffad engines`; the bundles may be read-only). Skipped when DIFFAD_BACKEND is onnxruntime, torch
#      or triton (Triton runs the models) or DIFFAD_BUILD_ENGINES=0; `diffad engines` itself skips cleanly on a machine with no GPU or
#      no TensorRT. A failed build stops the start only when DIFFAD_BACKEND=tensorrt; otherwise the
#      service starts on ONNX Runtime;
#   3. exec `diffad serve` on them, so the server replaces this shell and gets SIGTERM / SIGINT itself.
#
# Arguments: none; options for `diffad serve` (e.g. --port 9000), appended to its command line; or a
# command to run instead (e.g. `sh`, `diffad engines ...`).
#
# Environment (defaults): DIFFAD_MODELS_DIR (/models), DIFFAD_MODELS, DIFFAD_ENGINE_CACHE
# (/var/cache/diffad/engines), DIFFAD_BACKEND (auto), DIFFAD_BUILD_ENGINES (1), DIFFAD_ENGINE_PRECISION
# (fp16 | fp32; fp16), DIFFAD_ENGINE_MAX_BATCH (DIFFAD_MAX_BATCH_SIZE if set, else `diffad engines`'
# default), DIFFAD_BIN (diffad). Every other DIFFAD_* setting is read by `diffad serve` itself.
set -eu

log() { printf '%s diffad-entrypoint: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
die() { log "error: $*"; exit "${2:-2}"; }

# A command other than serve options: run it as it is (docker run IMAGE sh, ... diffad engines ...).
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

DIFFAD_BIN=${DIFFAD_BIN:-diffad}
MODELS_DIR=${DIFFAD_MODELS_DIR:-/models}
ENGINE_CACHE=${DIFFAD_ENGINE_CACHE:-/var/cache/diffad/engines}
BACKEND=${DIFFAD_BACKEND:-auto}
BUILD_ENGINES=${DIFFAD_BUILD_ENGINES:-1}
PRECISION=${DIFFAD_ENGINE_PRECISION:-fp16}
ENGINE_MAX_BATCH=${DIFFAD_ENGINE_MAX_BATCH:-${DIFFAD_MAX_BATCH_SIZE:-}}
case "$PRECISION" in
    fp16|fp32) ;;
    *) die "DIFFAD_ENGINE_PRECISION must be fp16 or fp32, got '$PRECISION'" ;;
esac

# --- 1. the bundles, kept newline-separated (folder names with spaces are fine; with newlines, not) ---
NL='
'
bundles=''
is_triton_model() {  # a Triton model folder: config.pbtxt and at least one numbered version holding a bundle
    [ -f "$1/config.pbtxt" ] || return 1
    for version in "$1"/[0-9]*/; do
        [ -f "${version}bundle.json" ] && return 0
    done
    return 1
}
add_bundle() {
    [ -f "$1/bundle.json" ] || is_triton_model "$1" \
        || die "$1 is not a model bundle (no bundle.json there; make one with \`diffad export\`)"
    bundles="$bundles$1$NL"
}
if [ -n "${DIFFAD_MODELS:-}" ]; then
    case "$DIFFAD_MODELS" in
        \[*) die "DIFFAD_MODELS: give the folders comma-separated, not as a JSON list, when starting through this script" ;;
    esac
    set -f
    old_ifs=$IFS
    IFS=,
    for dir in $DIFFAD_MODELS; do
        IFS=$old_ifs
        dir=$(printf '%s' "$dir" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')
        if [ -n "$dir" ]; then
            add_bundle "$dir"
        fi
    done
    IFS=$old_ifs
    set +f
elif [ -f "$MODELS_DIR/bundle.json" ]; then
    add_bundle "$MODELS_DIR"
else
    [ -d "$MODELS_DIR" ] || die "no models: $MODELS_DIR does not exist (mount the bundles there, or set DIFFAD_MODELS_DIR or DIFFAD_MODELS)"
    for dir in "$MODELS_DIR"/*/; do
        dir=${dir%/}
        if [ -f "$dir/bundle.json" ] || is_triton_model "$dir"; then
            add_bundle "$dir"
        fi
    done
fi
set -f  # no globbing from here on: the folder names are split on newlines only
[ -n "$bundles" ] || die "no model bundles found in $MODELS_DIR (each model is a folder with a bundle.json, made by \`diffad export\`)"

count=$(printf '%s' "$bundles" | grep -c '^')
log "$count model bundle(s): $(printf '%s' "$bundles" | tr '\n' ' ')"

# --- 2. TensorRT engines for this GPU -----------------------------------------------------------
build_engines() {
    case "$BACKEND" in
        onnxruntime|torch|triton) log "DIFFAD_BACKEND=$BACKEND: no TensorRT engines needed"; return 0 ;;
    esac
    case "$BUILD_ENGINES" in
        0|false|no|off) log "DIFFAD_BUILD_ENGINES=$BUILD_ENGINES: not building TensorRT engines"; return 0 ;;
    esac
    if ! mkdir -p "$ENGINE_CACHE" 2>/dev/null || [ ! -w "$ENGINE_CACHE" ]; then
        log "warning: engine cache $ENGINE_CACHE is not writable: no TensorRT engines built"
        if [ "$BACKEND" = tensorrt ]; then
            die "DIFFAD_BACKEND=tensorrt needs a writable DIFFAD_ENGINE_CACHE" 1
        fi
        return 0
    fi
    set --
    old_ifs=$IFS
    IFS=$NL
    for dir in $bundles; do
        set -- "$@" "$dir"
    done
    IFS=$old_ifs
    set -- "$@" --cache-dir "$ENGINE_CACHE"
    if [ "$PRECISION" = fp16 ]; then
        # a bundle exported before model.fp16.onnx existed gets an fp32 engine on TensorRT 11, not ONNX Runtime
        set -- "$@" --fp16 --or-fp32
    fi
    if [ -n "$ENGINE_MAX_BATCH" ]; then
        set -- "$@" --max-batch "$ENGINE_MAX_BATCH"
    fi
    log "checking TensorRT engines: $DIFFAD_BIN engines $*"
    if "$DIFFAD_BIN" engines "$@"; then
        return 0
    else
        status=$?
    fi
    if [ "$BACKEND" = tensorrt ]; then
        die "building TensorRT engines failed (exit $status) and DIFFAD_BACKEND=tensorrt" "$status"
    fi
    log "warning: building TensorRT engines failed (exit $status); serving with ONNX Runtime"
}
build_engines
if [ -d "$ENGINE_CACHE" ]; then
    export DIFFAD_ENGINE_CACHE="$ENGINE_CACHE"  # where `diffad serve` looks for the engines built above
fi

# --- 3. the server ---------------------------------------------------------------------------------
# The command line: BUNDLE... then the options given to this script. DIFFAD_MODELS is cleared: the bundles
# are on the command line, and the two must not add up.
unset DIFFAD_MODELS
options=$#
old_ifs=$IFS
IFS=$NL
for dir in $bundles; do
    set -- "$@" "$dir"
done
IFS=$old_ifs
while [ "$options" -gt 0 ]; do  # move the options behind the bundles
    set -- "$@" "$1"
    shift
    options=$((options - 1))
done
log "exec $DIFFAD_BIN serve $*"
exec "$DIFFAD_BIN" serve "$@"

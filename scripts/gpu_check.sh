#!/usr/bin/env bash
# The CUDA path checked on a GPU that has torch and Triton but no vLLM and no internet
# (the machine a developer is lent for minutes; docs/performance.md, "On a GPU").
#
#   OUT=/some/dir bash scripts/gpu_check.sh          # on the GPU machine, from the repository root
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh    # on a CPU machine: the same steps under
#                                                    # TRITON_INTERPRET=1, small sizes, no timing
#
# Writes under $OUT (default ./gpu-check-out), one file a step, and exits non-zero if a step failed:
#   device.txt         GPU, driver, torch and Triton versions
#   kernel_tests.txt   tests/test_triton_kernels.py compiled and run on the GPU (needs pytest: the
#                      machine's, or wheels placed in scripts/gpu_wheels/; skipped and said otherwise)
#   checks.md          bench_kernels.py --check-only: every kernel against the reference at sizes the
#                      interpreter cannot reach, batch invariance bit for bit, CUDA-graph replay == eager
#   bench-d{64,128,256}.md  decode attention at 1k-32k context, batch 1/8/32, against the bf16 paged
#                      baseline; store bandwidth
# Each step has its own time limit, so a hang in one still leaves the others' files.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
status=0

step() {  # step NAME SECONDS FILE COMMAND...: run, keep its output, remember a failure
    local name=$1 seconds=$2 file=$3
    shift 3
    local start=$SECONDS
    timeout "$seconds" "$@" >"$OUT/$file" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s -> $OUT/$file"
    [ "$rc" -eq 0 ] || status=1
}

{
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    git rev-parse HEAD 2>/dev/null || echo "revision: not a git checkout"
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

if [ "${GPU_CHECK_DRY_RUN:-0}" = "1" ]; then
    export TRITON_INTERPRET=1
    step "kernel tests (interpreter)" 900 kernel_tests.txt \
        "$PY" -m pytest -q -x -p no:cacheprovider tests/test_triton_kernels.py -k "decode_attention or invariant or same_bits"
    step "checks (interpreter, quick)" 900 checks.md \
        "$PY" scripts/bench_kernels.py --device cpu --check-only --quick
    exit $status
fi

if "$PY" -c "import pytest" 2>/dev/null \
    || "$PY" -m pip install -q --no-index --find-links scripts/gpu_wheels pytest >/dev/null 2>&1; then
    step "kernel tests" 240 kernel_tests.txt \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "not large_cache"
else
    echo "pytest is not installed here and scripts/gpu_wheels/ has none: kernel tests skipped (checks.md still \
runs every kernel against the reference)" >"$OUT/kernel_tests.txt"
    cat "$OUT/kernel_tests.txt"
fi
step "checks" 180 checks.md "$PY" scripts/bench_kernels.py --check-only
step "bench d128" 180 bench-d128.md \
    "$PY" scripts/bench_kernels.py --head-dim 128 --contexts 1024 8192 16384 32768 --batches 1 8 32 \
    --out "$OUT/bench-d128-table.md"
step "bench d64" 90 bench-d64.md \
    "$PY" scripts/bench_kernels.py --head-dim 64 --contexts 1024 8192 32768 --batches 1 8 32 \
    --out "$OUT/bench-d64-table.md"
step "bench d256" 90 bench-d256.md \
    "$PY" scripts/bench_kernels.py --head-dim 256 --num-q-heads 8 --num-kv-heads 1 --contexts 1024 8192 32768 \
    --batches 1 8 32 --out "$OUT/bench-d256-table.md"
exit $status

#!/usr/bin/env bash
# The one command for a GPU machine without network: install the project from this checkout,
# run the GPU tests, then the quick write benchmark. Logs and results go to $OUT as they are
# written (install.log, gpu-tests*.log, gpu-tests-*.xml, bench.log, results/*.json, results/*.png).
# The whole script stays inside BUDGET_S seconds (default 470): each step gets what is left.
#
#   OUT=/tmp/out scripts/gpu_check.sh
set -u -o pipefail
export PYTHONUNBUFFERED=1
# No max-autotune anywhere (the compiled baseline uses reduce-overhead only).
export TORCHINDUCTOR_MAX_AUTOTUNE=0 TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=0
# One Triton config per kernel (no autotuning sweep inside the check).
export GRADMEM_FAST_AUTOTUNE=${GRADMEM_FAST_AUTOTUNE:-0}

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gradmem-gpu-check}
mkdir -p "$OUT/results"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-470}
status=0

left() {  # seconds left for a step: what remains of the budget, at most $1
    local rest=$((BUDGET_S - ($(date +%s) - START)))
    [ "$rest" -lt "$1" ] && echo "$rest" || echo "$1"
}

step() {  # step NAME CAP LOG COMMAND...: run under timeout, output to LOG and stdout
    local name=$1 cap=$2 log=$3
    shift 3
    local limit
    limit=$(left "$cap")
    if [ "$limit" -le 5 ]; then
        echo "== $name: skipped, time budget spent" | tee -a "$log"
        status=1
        return 1
    fi
    echo "== $name (at most ${limit}s)"
    # SIGINT first: pytest then stops like on Ctrl-C and still writes its summary and junit xml.
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - START))s total" | tee -a "$log"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}

# CUDA_HOME: the toolkit root whose bin/ holds nvcc and lib64/ holds cudart (an nvcc found on
# PATH may be a wrapper script elsewhere).
if [ -z "${CUDA_HOME:-}" ]; then
    for root in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)" 2>/dev/null)")")"; do
        if [ -x "$root/bin/nvcc" ] && [ -d "$root/lib64" ]; then
            export CUDA_HOME=$root
            break
        fi
    done
fi
export MAX_JOBS=${MAX_JOBS:-16}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    python -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__)" 2>&1
    echo "CUDA_HOME=${CUDA_HOME:-unset} MAX_JOBS=$MAX_JOBS"
} | tee "$OUT/install.log"

step install 200 "$OUT/install.log" \
    python -m pip install --use-pep517 --no-build-isolation --no-deps --no-index -e .
step import-check 60 "$OUT/install.log" \
    python -c "import gradmem_fast.kernels.head_loss, gradmem_fast.kernels.attention, gradmem_fast._ext as e; print('kernels import; csrc:', e.reason() or 'built')"
# Four pytest processes at once (see the script); the step's own timeout is only a backstop.
GPU_TESTS_S=$(left 180)
step gpu-tests $((GPU_TESTS_S + 10)) "$OUT/gpu-tests.log" \
    python scripts/run_gpu_tests.py --out "$OUT" --seconds "$GPU_TESTS_S"

bench_args=(--quick --profile --out-dir "$OUT/results")
junits=()
for f in "$OUT"/gpu-tests-*.xml; do [ -s "$f" ] && junits+=("$f"); done
[ "${#junits[@]}" -gt 0 ] && bench_args+=(--gpu-tests "${junits[@]}")
step bench 280 "$OUT/bench.log" python -m gradmem_fast bench "${bench_args[@]}"

echo "== done in $(($(date +%s) - START))s, status $status; files in $OUT:"
ls -R "$OUT"
exit "$status"

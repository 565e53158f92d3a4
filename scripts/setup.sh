#!/usr/bin/env bash
# Install the dependencies and the project (editable). Builds the CUDA extension (csrc/) when a
# CUDA toolkit is found; GRADMEM_FAST_BUILD_CUDA=0 skips it. Needs network access to PyPI.
# The versions are the tested ones in constraints.txt; GRADMEM_FAST_UNPINNED=1 installs the newest
# releases instead (to see whether the project still passes with them).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(torch transformers numpy pytest pytest-benchmark ninja setuptools accelerate matplotlib)
if [ "${GRADMEM_FAST_UNPINNED:-0}" = "1" ]; then
    python -m pip install -q --upgrade "${PACKAGES[@]}"
else
    python -m pip install -q -c constraints.txt "${PACKAGES[@]}"
fi
python -m pip freeze --all | grep -iE '^(torch|triton|transformers|numpy|pytest|pytest-benchmark|ninja|setuptools|accelerate|matplotlib)==' \
    | tr '\n' ' ' && echo
# CUDA_HOME must be the toolkit root holding bin/nvcc and lib64/libcudart (torch's guess from the
# nvcc on PATH can be wrong and then fails to link cudart).
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    for root in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
        if [ -x "$root/bin/nvcc" ] && ls "$root"/lib64/libcudart* >/dev/null 2>&1; then
            export CUDA_HOME="$root"
            break
        fi
    done
fi
export MAX_JOBS="${MAX_JOBS:-2}"
# --use-pep517: the setuptools editable install (PEP 660) maps kernels/ to gradmem_fast.kernels; the
# legacy `setup.py develop` that older pips pick when `wheel` is installed would not.
python -m pip install -q --use-pep517 --no-build-isolation --no-deps -e .
python -c "import gradmem_fast, gradmem_fast._ext as e; print('gradmem_fast', gradmem_fast.__version__, '| csrc:', e.reason() or 'built')"

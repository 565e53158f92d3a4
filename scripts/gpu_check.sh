#!/usr/bin/env bash
# The one command for a GPU machine without network: scripts/gpu_check.py does the work (steps, time
# caps, files under $OUT); scripts/GPU_CHECK.md gives the plan and each step's expected time.
#
#   OUT=/tmp/out scripts/gpu_check.sh [--budget 285] [--dry-run]
set -u
cd "$(dirname "$0")/.."
exec python3 scripts/gpu_check.py "$@"

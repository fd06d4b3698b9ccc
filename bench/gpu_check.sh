#!/usr/bin/env bash
# The one-shot GPU check (issue 24), as the device machine runs it from the repository root:
#
#   bench/gpu_check.sh OUT_DIR [bench/gpu_check.py options]
#
# keepbits is imported from src/ (no install); nothing is installed. bench/gpu_check.py runs the
# steps (the CUDA build through native/build.sh first, then the checks), each in its own process
# under a global deadline, and rewrites OUT_DIR/gpu_check.json after every step. This wrapper
# bounds the whole run with `timeout` (KEEPBITS_GPU_CHECK_LIMIT_S, default 450 s; the script's
# own deadline is 30 s shorter), keeps its output in OUT_DIR/gpu_check.log and copies CMake's
# configure log of the build next to build.log. Python: $PYTHON, else python3.
# Files in OUT_DIR: gpu_check.json, gpu_check.log, build.log, steps.log, CMake's configure log.
set -uo pipefail

out="${1:?usage: bench/gpu_check.sh OUT_DIR [bench/gpu_check.py options]}"
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
limit="${KEEPBITS_GPU_CHECK_LIMIT_S:-450}"
build_dir="$PWD/native/build/gpu-check"

timeout -k 10 "$limit" "${PYTHON:-python3}" bench/gpu_check.py --out "$out" --deadline-s "$((limit - 30))" \
  --build-dir "$build_dir" "$@" 2>&1 | tee "$out/gpu_check.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu_check.sh: stopped by timeout after ${limit} s; gpu_check.json holds the steps done" | tee -a "$out/gpu_check.log"

for log in CMakeConfigureLog.yaml CMakeError.log; do
  [ -f "$build_dir/CMakeFiles/$log" ] && cp "$build_dir/CMakeFiles/$log" "$out/cmake_$log"
done
exit "$rc"

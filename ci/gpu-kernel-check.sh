#!/usr/bin/env bash
# On the GPU machine: build the standalone CUDA self-test (every kernel against a float64
# reference) and the forward tuning harness from csrc/ with nvcc alone (no torch, no pipeline),
# one object per translation unit in parallel, then run both. Logs go to $OUT.
#   usage: OUT=... bash ci/gpu-kernel-check.sh        env: ARCH (default 90a), SKIP_TUNE=1, SANITIZE=1,
#          SANITIZE_ONLY=<text>[|<text>] (the sanitizers run only the self-test cases whose name
#          contains one of the texts),
#          SELFTEST_TIMEOUT_S (default 180; the self-test takes ~25 s), SANITIZE_TIMEOUT_S (default
#          240 per tool), TUNE_TIMEOUT_S (default 400): a kernel that hangs ends its run with a "timed
#          out" line (naming the last self-test case started) instead of taking the whole device call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/_gpu-out}
BUILD=${BUILD:-/tmp/flash-selftest}
ARCH=${ARCH:-90a}
mkdir -p "$OUT" "$BUILD"
NVCC=(nvcc -std=c++17 -O3 --expt-relaxed-constexpr "-gencode=arch=compute_$ARCH,code=sm_$ARCH" -I csrc -Xptxas -v)
sources=(csrc/cuda/flash_fwd.cu csrc/cuda/flash_bwd.cu csrc/cuda/instantiations/*.cu csrc/cuda/selftest/flash_cuda_selftest.cu)
start=$(date +%s)
pids=()
for src in "${sources[@]}"; do
  obj="$BUILD/$(basename "${src%.cu}").o"
  "${NVCC[@]}" -c "$src" -o "$obj" >"$obj.log" 2>&1 &
  pids+=($!)
done
if [ "${SKIP_TUNE:-0}" != 1 ]; then
  "${NVCC[@]}" -c csrc/cuda/selftest/flash_cuda_tune.cu -o "$BUILD/flash_cuda_tune.o" >"$BUILD/flash_cuda_tune.log" 2>&1 &
  pids+=($!)
fi
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
cat "$BUILD"/*.log >"$OUT/ptxas.log"
echo "compiled in $(( $(date +%s) - start )) s (rc $rc)" | tee "$OUT/kernel-check.log"
[ "$rc" = 0 ] || { grep -B2 -A5 error "$OUT/ptxas.log" | head -60; exit 1; }
library=("$BUILD"/flash_fwd.o "$BUILD"/flash_bwd.o "$BUILD"/flash_*_hdim*.o)
nvcc -o "$BUILD/flash_selftest" "${library[@]}" "$BUILD/flash_cuda_selftest.o" || exit 1
if [ "${SKIP_TUNE:-0}" != 1 ]; then
  nvcc -o "$BUILD/flash_tune" "${library[@]}" "$BUILD/flash_cuda_tune.o" || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee -a "$OUT/kernel-check.log"
# The last case a log had started (its "name [dtype]" line), for the timeout message.
last_case() { grep -E "\[(bf16|fp16|fp8)\]$" "$1" | tail -1; }
# Correctness first: the self-test, then the timings.
timeout "${SELFTEST_TIMEOUT_S:-180}" "$BUILD/flash_selftest" 2>&1 | tee "$OUT/selftest.log" | grep -v -E "^ *ok" | tail -40
selftest_rc=${PIPESTATUS[0]}
if [ "$selftest_rc" = 124 ]; then
  echo "self-test timed out after ${SELFTEST_TIMEOUT_S:-180} s in: $(last_case "$OUT/selftest.log")" | tee -a "$OUT/kernel-check.log"
fi
if [ "${SKIP_TUNE:-0}" != 1 ]; then
  timeout "${TUNE_TIMEOUT_S:-400}" "$BUILD/flash_tune" 2>&1 | tee "$OUT/tune.log"
  [ "${PIPESTATUS[0]}" = 124 ] && echo "tune timed out after ${TUNE_TIMEOUT_S:-400} s" | tee -a "$OUT/kernel-check.log"
fi
if [ "${SANITIZE:-0}" = 1 ]; then
  for tool in memcheck racecheck synccheck; do
    FLASH_SELFTEST_ONLY=${SANITIZE_ONLY:-} timeout "${SANITIZE_TIMEOUT_S:-240}" \
      compute-sanitizer --tool "$tool" "$BUILD/flash_selftest" >"$OUT/sanitizer-$tool.log" 2>&1
    tool_rc=$?
    if [ "$tool_rc" = 124 ]; then
      echo "$tool timed out after ${SANITIZE_TIMEOUT_S:-240} s in: $(last_case "$OUT/sanitizer-$tool.log")" | tee -a "$OUT/kernel-check.log"
    else
      echo "$tool exit $tool_rc $(tail -1 "$OUT/sanitizer-$tool.log")" | tee -a "$OUT/kernel-check.log"
    fi
  done
fi
echo "selftest exit $selftest_rc" | tee -a "$OUT/kernel-check.log"
exit "$selftest_rc"

#!/usr/bin/env bash
# One device call (600 s) on the H100: build from source vs Hub kernel (a cold build of this
# machine's CUDA variant with every architecture, as a user gets it), then the training-loop
# benchmark (ours through transformers' hub-kernel loading, sdpa, eager; with and without Liger).
#   usage: OUT=... bash ci/gpu-train.sh
#   env: TRAIN_SEQLENS, TRAIN_EXTRA (more train_loop.py arguments), DEADLINE_S (default 560), SKIP_BUILD=1,
#        BENCH_DEVICE (default cuda; cpu tries the script on a machine without a GPU)
# Results: benchmarks/results/{build-vs-hub,train-loop}-h100-<date>.{json,md,png}, archived in $OUT/results.tgz.
set -uo pipefail
. "$(dirname "$0")/gpu-env.sh"
DAY=$(date -u +%F)
DEVICE=${BENCH_DEVICE:-cuda}

# Not forced to sm_90: the timed build is the one a user runs, every architecture of the variant.
timeout -s TERM $(budget 250) python3 benchmarks/build_vs_hub.py --device "$DEVICE" --jobs "$MAX_JOBS" --rounds 3 \
  --name "build-vs-hub-h100-$DAY" 2>&1 | tee "$OUT/build-vs-hub.log"
save
echo "build vs hub done, $(left) s left"

# The training loop needs this checkout's build/ (published by the script to a temporary embedded repository).
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS:-9.0} python3 -m flash_attn_kernel build --jobs "$MAX_JOBS" 2>&1 \
    | tee "$OUT/build.log" | tail -3
fi
b=$(budget 260)
# shellcheck disable=SC2086  # TRAIN_EXTRA is a list of arguments
timeout -s TERM -k 10 $((b + 45)) python3 benchmarks/train_loop.py --device "$DEVICE" --time-budget "$b" \
  --seqlens "${TRAIN_SEQLENS:-2048,4096,8192,16384}" ${TRAIN_EXTRA:-} --name "train-loop-h100-$DAY" 2>&1 | tee "$OUT/train-loop.log"
save
python3 -m flash_attn_kernel docs && cp docs/attention-comparison.md "$OUT/"
echo "done in $(( $(date +%s) - CALL_START )) s"

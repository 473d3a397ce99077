#!/usr/bin/env bash
# One device call (600 s) on an H100 / H200 that checks a kernel change end to end: build this
# machine's variant (sm_90a only), run the kernel tests through the variant loaded by kernels, then
# benchmark with the time left: decode, the FP8 forward, then bf16 forward and backward against
# SDPA's flash and cuDNN backends (head dims 128, 64, 256). ci/gpu-bench.sh runs the whole comparison instead.
#   usage: OUT=... bash ci/gpu-verify.sh      env: BENCH_NAME, DEADLINE_S (default 560), SEQLENS,
#          TESTS (default: the kernel tests), STAGES (default decode,fp8,bf16: the benchmark stages;
#          sm80: the sm80-class kernels, FLASH_ATTN_CUDA_HOPPER=0, against SDPA flash, into
#          benchmarks/results/sm80-class/, apart from the runs the docs show)
# Results: $OUT/tests.log, benchmarks/results/$BENCH_NAME.{json,md} archived in $OUT/results.tgz.
set -uo pipefail
. "$(dirname "$0")/gpu-env.sh"
NAME=${BENCH_NAME:-$(card)-attention-$(date -u +%F)}
SEQLENS=${SEQLENS:-512,2048,8192,16384}
TESTS=${TESTS:-tests/test_attention.py tests/test_fp8.py tests/test_bad_input.py tests/test_attention_reference.py}
STAGES=${STAGES:-decode,fp8,bf16}
stage() { [[ ",$STAGES," == *",$1,"* ]]; }

# The tests' session fixture reuses this build (same sources, same architecture list).
export FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS:-9.0}
python3 -m flash_attn_kernel build --jobs "$MAX_JOBS" 2>&1 | tee "$OUT/build.log" | tail -3
[ "${PIPESTATUS[0]}" = 0 ] || { echo "build failed"; exit 1; }
# shellcheck disable=SC2086  # TESTS is a list of paths
timeout "$(budget 300)" python3 -m pytest -q -rs -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/tests.log" | tail -3
test_rc=${PIPESTATUS[0]}
echo "pytest exit code $test_rc, $(left) s left" | tee -a "$OUT/tests.log"

rm -f "benchmarks/results/$NAME.json"
# Decode first: it is short, and a call squeezed for time still records it.
stage decode && bench 40 --ops decode --dtypes bf16 --repeats 50
# The FP8 forward (ours alone: SDPA takes no FP8), 16k tokens as the rest.
stage fp8 && bench 60 --ops fwd --dtypes fp8 --hdims 128,256,64 --seqlens "$SEQLENS" --repeats 20 --point-seconds 0.5
stage bf16 && bench 240 --ops fwd,bwd --dtypes bf16 --hdims 128,64,256 --seqlens "$SEQLENS" --repeats 20 --point-seconds 0.5 \
          --peers sdpa-flash,sdpa-cudnn
if stage sm80; then
  mkdir -p benchmarks/results/sm80-class
  NAME=sm80-class/$NAME LABEL='flash-attn-kernel[cuda sm80-class]' FLASH_ATTN_CUDA_HOPPER=0 \
    bench 200 --ops fwd,bwd --dtypes bf16 --hdims 128,64,256 --seqlens "$SEQLENS" --repeats 20 --point-seconds 0.5 \
    --peers sdpa-flash
fi
[ -f "benchmarks/results/$NAME.json" ] && python3 -m flash_attn_kernel bench --render "benchmarks/results/$NAME.json" | tail -1
save
echo "done in $(( $(date +%s) - CALL_START )) s"
exit "$test_rc"

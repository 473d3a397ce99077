#!/usr/bin/env bash
# One device call (600 s) on an H100 / H200: build this machine's variant (sm_90a only), then the
# attention benchmark in stages that each stop starting points when their budget is spent, most important
# first: decode; bf16 fwd/bwd against SDPA's backends and eager; fp16; bf16 fwd+bwd; FlexAttention
# last (its compiles are the least predictable cost). All stages append to one results file.
#   usage: OUT=... bash ci/gpu-bench.sh
#   env: BENCH_NAME, BENCH_LABEL, DEADLINE_S (default 560), SEQLENS, SKIP_BUILD=1 (build/ is current),
#        BENCH_EXTRA (appended to every stage's arguments, e.g. a tiny grid to try the script on a CPU)
# Results: benchmarks/results/$BENCH_NAME.{json,md} and PNGs, archived in $OUT/results.tgz after each stage.
set -uo pipefail
. "$(dirname "$0")/gpu-env.sh"
NAME=${BENCH_NAME:-$(card)-attention-$(date -u +%F)}
SEQLENS=${SEQLENS:-512,2048,8192,16384}

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS:-9.0} python3 -m flash_attn_kernel build --jobs "$MAX_JOBS" 2>&1 \
    | tee "$OUT/build.log" | tail -3
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "build failed"; exit 1; }
fi
echo "build done, $(left) s left"

rm -f "benchmarks/results/$NAME.json"
bench 40  --ops decode --dtypes bf16,fp16 --repeats 50
bench 170 --ops fwd,bwd --dtypes bf16 --hdims 128,64,256 --seqlens "$SEQLENS" --repeats 20 --point-seconds 0.5 \
          --peers sdpa-flash,sdpa-cudnn,sdpa-efficient,eager
bench 70  --ops fwd,bwd --dtypes fp16 --hdims 128,64,256 --seqlens "$SEQLENS" --repeats 20 --point-seconds 0.5 \
          --peers sdpa-flash,sdpa-cudnn,sdpa-efficient
bench 40  --ops fwdbwd --dtypes bf16 --hdims 128 --seqlens "$SEQLENS" --repeats 20 --point-seconds 0.5 \
          --peers sdpa-flash,sdpa-cudnn,sdpa-efficient,eager
bench 400 --ops fwd,bwd --dtypes bf16 --hdims 128,64,256 --seqlens "$SEQLENS" --repeats 20 --point-seconds 0.5 \
          --peers flex --without-ours
python3 -m flash_attn_kernel bench --render "benchmarks/results/$NAME.json" | tail -1
python3 -m flash_attn_kernel docs && cp docs/attention-comparison.md "$OUT/"
save
echo "done in $(( $(date +%s) - CALL_START )) s"

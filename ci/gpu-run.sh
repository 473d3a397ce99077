#!/usr/bin/env bash
# On a GPU machine without network (the H100 test machine): use the machine's own torch, add the
# pipeline's missing packages from wheels carried in .whl/, build this machine's variants, run the
# test suite and the benchmark, and leave logs and results in $OUT.
#   usage: bash ci/gpu-run.sh [pytest args...]      env: BENCH_ARGS, SKIP_BENCH=1, OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/_gpu-out}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
# Wheels carried in .whl/ (and pyarrow, too large to travel with them, installed by an earlier call
# into /tmp/site) go to /tmp/site.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, kernels; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'kernels', kernels.__version__)"
  nvcc --version | tail -1
} | tee "$OUT/versions.txt"

python3 -m flash_attn_kernel build --jobs "$MAX_JOBS" 2>&1 | tee "$OUT/build.log"
build_rc=${PIPESTATUS[0]}
[ "$build_rc" = 0 ] || { echo "build failed ($build_rc)"; exit "$build_rc"; }

python3 -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$OUT/tests.log"
test_rc=${PIPESTATUS[0]}
echo "pytest exit code $test_rc" | tee -a "$OUT/tests.log"

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # shellcheck disable=SC2086
  python3 -m flash_attn_kernel bench ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  cp benchmarks/results/*.json benchmarks/results/*.md "$OUT/" 2>/dev/null
fi
exit "$test_rc"

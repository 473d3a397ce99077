# Sourced by the device scripts (ci/gpu-bench.sh, ci/gpu-verify.sh, ci/gpu-train.sh): the machine's
# own torch, the pipeline's missing packages from the wheels carried in .whl/ (installed into
# /tmp/site), a record of card, driver, clocks and versions in $OUT/versions.txt, a timer against the
# call's limit, and the benchmark stage helper.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
CALL_START=$(date +%s)
OUT=${OUT:-$PWD/_gpu-out}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "warning: installing .whl/ failed; using what the machine has"
fi
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv,noheader
  python3 -c "import torch, kernels; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'kernels', kernels.__version__)"
  python3 -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/versions.txt"

# Seconds left before the call's deadline (DEADLINE_S after the start, default 560 of the 600 allowed).
left() { echo $(( ${DEADLINE_S:-560} - ($(date +%s) - CALL_START) )); }
# The smaller of a stage's own budget and what the call has left, keeping RESERVE_S for the end.
budget() { local want=$1 have; have=$(( $(left) - ${RESERVE_S:-30} )); echo $(( want < have ? want : have )); }
# Results so far to $OUT, after every stage: a call cut by its limit still brings back what ran.
# One archive of the result files this call wrote (the device returns at most 8 files per call).
save() {
  find benchmarks/results -type f -newer "$OUT/versions.txt" -print0 | tar -czf "$OUT/results.tgz" --null -T - 2>/dev/null
  true
}

# The card's short name for results files: h100, h200, ...
card() { nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}'; }

# bench BUDGET_S ARGS...: one benchmark stage appended to $NAME (results file) with label $LABEL,
# killed 60 s after its budget at the latest; output in $OUT/bench.log, results saved after it.
LABEL=${BENCH_LABEL:-flash-attn-kernel[cuda]}
bench() {
  local b; b=$(budget "$1"); shift
  if [ "$b" -le 10 ]; then echo "skipping stage ($b s left): $*"; return; fi
  echo "== stage (${b} s): $*"
  # shellcheck disable=SC2086  # BENCH_EXTRA is a list of arguments
  timeout -s TERM -k 10 $((b + 60 < $(left) - 15 ? b + 60 : $(left) - 15)) \
    python3 -m flash_attn_kernel bench --device cuda --name "$NAME" --append --label "$LABEL" --time-budget "$b" "$@" ${BENCH_EXTRA:-} \
    2>&1 | tee -a "$OUT/bench.log" | grep -v '^|'
  save
}

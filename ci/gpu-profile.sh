#!/usr/bin/env bash
# On the GPU machine: Nsight Compute on one launch of one kernel of the timing harness
# (csrc/cuda/selftest/flash_cuda_tune.cu, built by ci/gpu-kernel-check.sh into /tmp/flash-selftest),
# with the full section set and warp-state samples per SASS instruction. Writes
# $OUT/$NAME-details.txt (ncu's details page) and $OUT/$NAME-summary.txt (benchmarks/ncu_summary.py).
#   usage: OUT=... KERNEL='bwd_wgmma_kernel<__nv_bfloat16, .int.128' LAUNCH_SKIP=50 \
#            FLASH_TUNE_SECTIONS=bwd bash ci/gpu-profile.sh
#   KERNEL: a regex on the demangled name as ncu spells it, template arguments included
#   ('bwd_wgmma_kernel<__nv_bfloat16, (int)128, ...BwdWgmmaConfig<(int)128, (int)64, (int)2, (bool)1, ...':
#   '(' and ')' as '.', so '.int.128', '.bool.1'); LAUNCH_SKIP: launches of matching
#   kernels to pass over first (the harness runs each candidate and shape 1 + 3 + 20 times, after the
#   production entry's own launch where its section has one); NAME (default profile); COMMAND: what
#   to profile instead of the harness, e.g. a peer's kernel on the bench's shape:
#   COMMAND='python3 benchmarks/peer_calls.py --impl sdpa-flash --op bwd --hdim 128' KERNEL=flash_bwd_dq_dk_dv
#   (the repository root is on PYTHONPATH; ci/gpu-env.sh is not sourced, so the machine's own torch).
# The clocks are left as they are (--clock-control none), as the device notes ask.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/_gpu-out}
NAME=${NAME:-profile}
TUNE=${TUNE:-/tmp/flash-selftest/flash_tune}
mkdir -p "$OUT"
if [ -z "${COMMAND:-}" ]; then
  [ -x "$TUNE" ] || { echo "no $TUNE: run ci/gpu-kernel-check.sh first (SKIP_TUNE unset)"; exit 1; }
  COMMAND=$TUNE
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
: "${KERNEL:?set KERNEL to a regex on the demangled kernel name}"
# shellcheck disable=SC2086  # COMMAND is a command line
timeout "${PROFILE_TIMEOUT_S:-240}" ncu --clock-control none --kernel-name-base demangled -k "regex:$KERNEL" \
  --launch-skip "${LAUNCH_SKIP:-0}" --launch-count 1 --set full -o "$OUT/$NAME" $COMMAND >"$OUT/$NAME-ncu.log" 2>&1
[ -f "$OUT/$NAME.ncu-rep" ] || { tail -20 "$OUT/$NAME-ncu.log"; exit 1; }
ncu --import "$OUT/$NAME.ncu-rep" --page details >"$OUT/$NAME-details.txt" 2>&1
ncu --import "$OUT/$NAME.ncu-rep" --page source --csv --print-source sass | gzip >"$OUT/$NAME-sass.csv.gz"
python3 benchmarks/ncu_summary.py "$OUT/$NAME-sass.csv.gz" >"$OUT/$NAME-summary.txt"
rm -f "$OUT/$NAME.ncu-rep"  # several MB; the two text files hold what the notes cite
head -30 "$OUT/$NAME-summary.txt"

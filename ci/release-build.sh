#!/usr/bin/env bash
# Release matrix job: build one group of variants, check them, and (with RUN_CPU_TESTS=1) run the
# CPU tests. The builds are left in $PROJECT/build/ for the workflow to upload as an artifact.
#   usage: bash ci/release-build.sh VARIANT...      env: PROJECT (default: the repository), RUN_CPU_TESTS
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
project=${PROJECT:-$PWD}
[ "$#" -gt 0 ] || { echo "usage: $0 VARIANT..." >&2; exit 2; }

args=()
for variant in "$@"; do args+=(--variant "$variant"); done
echo "::group::build $*"
python -m flash_attn_kernel --project "$project" build --redistributable "${args[@]}"
echo "::endgroup::"

# `build` checks what it builds; checking again here makes the artifact's state explicit in the log.
for variant in "$@"; do
  python -m flash_attn_kernel --project "$project" check "$project/build/$variant"
done

if [ "${RUN_CPU_TESTS:-0}" = 1 ]; then
  echo "::group::CPU tests"
  python -m pytest -q -p no:cacheprovider -m "not cuda" "$project/tests"
  echo "::endgroup::"
fi

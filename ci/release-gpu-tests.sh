#!/usr/bin/env bash
# Release GPU job: run the CUDA tests against the CUDA variants the matrix jobs built.
#   usage: bash ci/release-gpu-tests.sh ARTIFACTS_DIR      env: PROJECT (default: the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
project=${PROJECT:-$PWD}
[ "$#" = 1 ] || { echo "usage: $0 ARTIFACTS_DIR" >&2; exit 2; }

python ci/release.py gather "$1" "$project/build"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -m pytest -q -p no:cacheprovider -m cuda "$project/tests"

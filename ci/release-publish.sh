#!/usr/bin/env bash
# Release publish job: check the tag, gather every variant the matrix built, publish them in one
# commit per branch. Arguments after the artifacts directory go to `flash-attn-kernel publish`:
# the workflow passes --repo-id (the token comes from HF_TOKEN); locally, --local publishes to
# the embedded repository instead. The result is written to build/publish-result.json.
#   usage: bash ci/release-publish.sh TAG ARTIFACTS_DIR [publish args...]
#   env: PROJECT (default: the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
project=${PROJECT:-$PWD}
[ "$#" -ge 2 ] || { echo "usage: $0 TAG ARTIFACTS_DIR [publish args...]" >&2; exit 2; }
tag=$1 artifacts=$2
shift 2

python ci/release.py check-tag "$tag" --project "$project"
python ci/release.py gather "$artifacts" "$project/build"
python -m flash_attn_kernel --project "$project" publish --output-json "$project/build/publish-result.json" "$@"

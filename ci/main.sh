#!/usr/bin/env bash
# The main job: set up .venv if needed, then build for this machine, verify, publish to the
# embedded local repository and load the kernel back through `kernels`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
. .venv/bin/activate
flash-attn-kernel main "$@"

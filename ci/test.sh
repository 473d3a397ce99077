#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole test suite.
# Kernel tests run on every backend present (CPU always, CUDA where a GPU is).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
. .venv/bin/activate
# tests/test_flake.py parses flake.nix with Debian's nix-instantiate, unpacked into .cache/.
if command -v apt-get >/dev/null && ! bash ci/install-nix-parser.sh >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null 2>&1; fi
  bash ci/install-nix-parser.sh >/dev/null || echo "test: could not install the nix parser; the flake test will skip"
fi
python -m pytest -q "$@"

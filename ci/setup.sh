#!/usr/bin/env bash
# Creates .venv with everything the pipeline and its tests need, starting from nothing.
# torch: an existing install in the environment is kept; otherwise TORCH_SPEC is installed
# (default torch==2.13.0). The pipeline compiles CUDA code with nvcc and needs only torch's
# headers and libraries, so a CPU build of torch is enough to build CUDA variants.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" 2>/dev/null; then
  echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".[test]"
python -c "import torch, kernels; print(f'setup: torch {torch.__version__}, kernels {kernels.__version__}')"

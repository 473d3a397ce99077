#!/usr/bin/env bash
# Downloads every wheel the offline GPU test machine lacks for the whole test suite, for its
# Python 3.12 on x86_64 Linux, without dependencies (the list below is the closure, checked by hand
# against what that machine has: torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0,
# accelerate 1.15.0, huggingface_hub 1.33.0, numpy, PyYAML, rich, pytest and their dependencies).
#
#   usage: bash ci/fetch-device-wheels.sh
#
# Two folders, each small enough to travel with the working tree in one device call:
#   .whl/                          (~36 MB) the pipeline's and the transformers/TRL tests' wheels;
#                                  ci/gpu-run.sh installs them into /tmp/site
#   .cache/device-wheels-pyarrow/  (~41 MB) pyarrow alone (datasets, hence TRL, imports it)
# On a warm device machine, carry .cache/device-wheels-pyarrow first and install it into the same
# /tmp/site, then run ci/gpu-run.sh carrying .whl (see docs/transformers-trl.md).
set -euo pipefail
cd "$(dirname "$0")/.."

PLATFORM=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 --abi abi3
          --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform any)

# The pipeline (kernels loader and ABI checker) and its small dependencies.
PIPELINE=(kernels==0.17.2 kernels-data==0.16.2 kernel-abi-check==0.14.1 tomlkit==0.15.2
          rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2)
# transformers 5.17 accepts only kernels <0.17 (is_kernels_available's window); 5.18 takes 0.17.
# TRL and Liger, then datasets and what it imports that the machine lacks (aiohttp's stack,
# requests', pandas'). pandas 2.3 still runs on numpy 1.26 as well as 2.x.
HF=(transformers==5.18.0 trl==1.16.0 liger-kernel==0.8.5 datasets==4.8.5
    dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.2.0
    requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.2
    aiohttp==3.14.5 aiosignal==1.4.0 aiohappyeyeballs==2.7.1 attrs==26.1.0 frozenlist==1.8.0
    multidict==7.2.1 propcache==0.5.4 yarl==1.25.1
    pandas==2.3.3 python-dateutil==2.9.0.post0 six==1.17.0 pytz==2025.2 tzdata==2025.2)
ARROW=(pyarrow==21.0.0)

fetch() {  # fetch DIR SPEC...: the wheels of SPEC into DIR, replacing what DIR held
  local dir=$1; shift
  rm -rf "$dir"
  mkdir -p "$dir"
  python3 -m pip download --quiet --disable-pip-version-check "${PLATFORM[@]}" -d "$dir" "$@"
  echo "$dir: $(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1)"
}

fetch .whl "${PIPELINE[@]}" "${HF[@]}"
fetch .cache/device-wheels-pyarrow "${ARROW[@]}"

#!/usr/bin/env bash
# Stage the wheels bench/device_check.sh installs on a GPU machine without network, into ./.whl (git-ignored).
# The CUDA image has torch, triton, tensorboard, scipy, safetensors, numpy, pillow; igscale also needs deepspeed,
# diffusers, boto3, webdataset (the shared set) and, for the CUDA tests, pytest. Run here, where PyPI is reachable:
#   bench/fetch_device_wheels.sh [SHARED_WHEELS_DIR]      # default ../shared/device_wheels
# then call the device with carry [".whl"] and `bash bench/device_check.sh`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="${1:-$ROOT/../shared/device_wheels}"
DEST="$ROOT/.whl"
mkdir -p "$DEST"
if [ -d "$SHARED" ]; then cp -n "$SHARED"/*.whl "$DEST"/; else echo "warning: $SHARED not found" >&2; fi
PY="${PYTHON:-$ROOT/.venv/bin/python}"
# pure-Python test tools (and two small deps the image may lack), pinned like launch/setup_env.sh
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 PyYAML==6.0.4 tqdm==4.70.1
du -sh "$DEST"
ls "$DEST"

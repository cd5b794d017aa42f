#!/usr/bin/env bash
# The GPU run kit on a stand-in for the device machine, HERE (no GPU): CPython 3.12 with the device image's
# torch 2.11 / torchvision 0.26 and the packages the kit expects there (/work/.library/device/KINDS.md), the
# carried wheels installed into a scratch SITE (KIT_INSTALL=1, as on the device), the carried redis-server and
# Java runtime. Catches what `make gpu-kit-test` (this venv, no install) cannot: the install step, console
# scripts from $SITE/bin, model-server.jar put back, a Python without this project's dependencies.
#
#   bash scripts/gpu/simulate.sh                      (or: make gpu-kit-sim; KIT_STEPS=... to narrow it)
#
# Needs .gpu_kit/ (scripts/gpu/prepare.sh), uv, and a CPython 3.12 (SIM_PYTHON, a pyenv one, or one uv finds). The venv (~5 GB: torch's
# CUDA build) is kept in $SIM_VENV between runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
SIM_VENV=${SIM_VENV:-/tmp/e2vpt-device-sim}
# what the device image holds that the kit relies on (not carried); versions as seen there where known
DEVICE_PACKAGES=(torch==2.11.0 torchvision==0.26.0 numpy pillow safetensors prometheus-client pytest
    pytest-timeout httpx hypothesis pyyaml tqdm psutil packaging click h11 anyio annotated-doc onnx
    onnxruntime matplotlib pip)
if [ ! -x "$SIM_VENV/bin/python" ]; then
    # SIM_PYTHON, else a pyenv 3.12 (its shim answers only when 3.12 is pyenv's global), else what uv finds
    py312=${SIM_PYTHON:-$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)}
    uv venv -q -p "${py312:-3.12}" "$SIM_VENV"
fi
uv pip install -q --python "$SIM_VENV/bin/python" "${DEVICE_PACKAGES[@]}"
SITE=$(mktemp -d /tmp/e2vpt-sim-site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT
PYTHON=$SIM_VENV/bin/python SITE=$SITE KIT_INSTALL=1 OUT=${OUT:-/tmp/e2vpt-gpu-sim-out} bash scripts/gpu/run.sh

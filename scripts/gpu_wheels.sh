#!/usr/bin/env bash
# Wheels the GPU machine lacks, fetched here into .whl/ (git-ignored) so they travel with the GPU
# call (the device tool's `carry: [".whl"]`); scripts/gpu_check.sh installs them first.
# Its image has torch 2.11, triton 3.6, transformers, accelerate, safetensors, einops, matplotlib
# and pytest but no diffusers (the step's and the VAE's baseline, and the patch tests) nor
# expecttest (torch.library.opcheck). All pure Python: about 6.5 MB.
#
#   bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "diffusers==0.42.1" "importlib_metadata==8.7.0" "expecttest==0.3.0"
ls -l .whl

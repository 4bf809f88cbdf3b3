#!/usr/bin/env bash
# The diffusers-facing tests (the drop-in patch and the reference models' parity with diffusers)
# against other diffusers releases, each in a fresh venv where pip resolves that release's own
# dependencies (huggingface_hub, transformers) instead of borrowing ours. CI runs it on 0.36.0,
# the oldest release pyproject.toml's [diffusers] extra accepts; the main test run covers the newest.
#
#   bash scripts/diffusers_compat.sh 0.36.0 [0.39.0 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ $# -gt 0 ] || { echo "usage: $0 DIFFUSERS_VERSION..."; exit 2; }
for version in "$@"; do
  venv=$(mktemp -d)
  echo "== diffusers $version in $venv"
  $PY -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip "setuptools>=64" wheel
  "$venv/bin/python" -m pip install -q "torch==2.13.0" "numpy<2.3"
  "$venv/bin/python" -m pip install -q --no-build-isolation -e ".[test]" "diffusers==$version" "transformers>=4.45" "accelerate>=0.31" "peft>=0.15" "ftfy>=6"
  "$venv/bin/python" -c "import diffusers, transformers; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider -n 2 \
    tests/integrations tests/models/test_dit_diffusers_parity.py tests/models/test_vae_diffusers_parity.py \
    tests/models/test_lora.py tests/models/test_text_encoder.py
  rm -rf "$venv"
done

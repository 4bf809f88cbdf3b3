#!/usr/bin/env bash
# The diffusers-facing tests (the drop-in patch and the reference models' parity with diffusers)
# against other diffusers releases, each in a fresh venv where pip resolves that release's own
# dependencies (huggingface_hub, transformers) instead of borrowing ours. CI runs it on 0.36.0,
# the oldest release pyproject.toml's [diffusers] extra accepts; the main test run covers the newest.
#
#   bash scripts/diffusers_compat.sh 0.36.0 [0.39.0 ...]
#   (CI: --install DIR VERSION in the background, then --test DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# One venv for one release: install fills it with every dependency (fastdit's own and its [test]
# extra's, read from pyproject.toml) but not fastdit, so it may run beside another install of this
# checkout; run_tests adds the editable fastdit (nothing else left to resolve) and runs the tests.
install() {  # DIR VERSION
  echo "== diffusers $2 in $1"
  $PY -m venv "$1"
  "$1/bin/python" -m pip install -q --upgrade pip "setuptools>=64" wheel
  "$1/bin/python" -m pip install -q "torch==2.13.0" "numpy<2.3"
  mapfile -t deps < <("$1/bin/python" -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']
print('\n'.join(p['dependencies'] + p['optional-dependencies']['test']))")
  "$1/bin/python" -m pip install -q "${deps[@]}" "diffusers==$2" "transformers>=4.45" "accelerate>=0.31" "peft>=0.15" "ftfy>=6"
}
run_tests() {  # DIR
  "$1/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
  "$1/bin/python" -c "import diffusers, transformers; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  "$1/bin/python" -m pytest -q -p no:cacheprovider -n 2 \
    tests/integrations tests/models/test_dit_diffusers_parity.py tests/models/test_vae_diffusers_parity.py \
    tests/models/test_lora.py tests/models/test_text_encoder.py
}

# CI installs in the background while other work runs, then tests:
#   bash scripts/diffusers_compat.sh --install DIR VERSION ; bash scripts/diffusers_compat.sh --test DIR
case "${1:-}" in
  --install) [ $# -eq 3 ] || { echo "usage: $0 --install DIR VERSION"; exit 2; }; install "$2" "$3"; exit ;;
  --test) [ $# -eq 2 ] || { echo "usage: $0 --test DIR"; exit 2; }; run_tests "$2"; exit ;;
esac
[ $# -gt 0 ] || { echo "usage: $0 DIFFUSERS_VERSION..."; exit 2; }
for version in "$@"; do
  venv=$(mktemp -d)
  install "$venv" "$version"
  run_tests "$venv"
  rm -rf "$venv"
done

#!/usr/bin/env bash
# fastdit's one GPU script. On an H100 machine that has the repo and the packages but no network:
#   1. installs this checkout in place with the CUDA extension (sm_90a unless FASTDIT_CUDA_ARCHS),
#   2. runs `fastdit info` and `pytest -m gpu`,
#   3. runs the benchmarks in quick mode (pass FULL=1 for the full-size shapes),
# writing logs and results into OUT_DIR (default benchmarks/results) and printing a table last.
# Wheels of missing packages (diffusers, say) may be placed in .whl/; they are installed first.
#
#   bash scripts/gpu_check.sh [OUT_DIR]
# TESTS=0 or BENCH=0 skips that half (to split the work over two calls if one would pass 10 min);
# SUITES="memory_ops attention" runs only those benchmark suites (default: all of them);
# BENCH_EXTRA adds flags to every `fastdit bench` call.
# Each step is killed after STEP_TIMEOUT seconds (default 500), so a hung kernel costs one step,
# not the call: benchmarks save every row as it is measured, tests print each result (-v), and
# the opt-in attention paths (TMA, persistent, warp specialization) are tested in a step of
# their own after the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/results}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
export FASTDIT_CUDA_ARCHS=${FASTDIT_CUDA_ARCHS:-90a}
PY=${PYTHON:-python3}
failed=()

run() {  # run NAME CMD...: log to OUT_DIR/gpu_NAME.log, remember failures
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  timeout -k 15 "${STEP_TIMEOUT:-500}" "$@" >"$OUT_DIR/gpu_$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "== $name: killed after ${STEP_TIMEOUT:-500} s (STEP_TIMEOUT)"
  tail -n 15 "$OUT_DIR/gpu_$name.log"
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ $rc -eq 0 ] || failed+=("$name")
  return $rc
}

if compgen -G ".whl/*.whl" >/dev/null; then
  run wheels $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastdit-site .whl/*.whl
  export PYTHONPATH=/tmp/fastdit-site${PYTHONPATH:+:$PYTHONPATH}
fi

run install $PY -m pip install --no-build-isolation --no-deps --no-index -v -e . || {
  echo "install failed; see $OUT_DIR/gpu_install.log"
  exit 1
}
run info $PY -m fastdit info
if [ "${TESTS:-1}" = "1" ]; then
  run pytest $PY -m pytest -m gpu -v -rs -k "not opt_in_variants" tests
  run pytest_optin $PY -m pytest -m gpu -v -rs -k opt_in_variants tests/ops/test_attention_triton.py
fi
BENCH_ARGS=(--quick)
[ "${FULL:-0}" = "1" ] && BENCH_ARGS=()
# BENCH_EXTRA: more `fastdit bench` flags, e.g. "--conv-policy-out $OUT/causal_conv3d.json"
read -r -a EXTRA <<<"${BENCH_EXTRA:-}"
[ ${#EXTRA[@]} -gt 0 ] && BENCH_ARGS+=("${EXTRA[@]}")
if [ "${BENCH:-1}" = "1" ]; then
  if [ -n "${SUITES:-}" ]; then
    for suite in $SUITES; do run "bench_$suite" $PY -m fastdit bench --suite "$suite" "${BENCH_ARGS[@]}" --out "$OUT_DIR"; done
  else
    run bench $PY -m fastdit bench "${BENCH_ARGS[@]}" --out "$OUT_DIR"
  fi
fi

{
  echo "fastdit gpu_check $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  for log in "$OUT_DIR"/gpu_pytest*.log; do
    [ -f "$log" ] && echo "$(basename "$log"): $(grep -E "passed|failed|error" "$log" | tail -1)"
  done
  for log in "$OUT_DIR"/gpu_bench*.log; do
    [ -f "$log" ] && sed -n '/^\(memory_ops\|attention\|dit_step\|vae\|vae_ops\) on /,/^wrote /p' "$log" | grep -v '^wrote'
  done
  [ ${#failed[@]} -eq 0 ] && echo "all steps passed" || echo "FAILED steps: ${failed[*]}"
} | tee "$OUT_DIR/gpu_summary.txt"
[ ${#failed[@]} -eq 0 ]

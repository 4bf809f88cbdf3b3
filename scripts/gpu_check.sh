#!/usr/bin/env bash
# fastdit's one GPU call: everything the first H200/H100 session must decide, in one prepared
# run that fits the device budget (15 minutes per issue, at most 10 per command, 8 files back).
#
#   bash scripts/gpu_check.sh [OUT_DIR]              on the GPU machine (default benchmarks/results/gpu)
#   bash scripts/gpu_check.sh --dry-run OUT_DIR      the same driver on a CPU: tiny shapes, Triton's
#                                                    interpreter, the same steps, files and JSON schema
#
# BUDGET_S (default 480): wall seconds for the whole call. Each step gets its own cap, cut to what
# is left of the budget (less a reserve for the report), and is killed when it runs over: a hung
# kernel costs one step, not the call. Benchmarks save every row as they measure it, and the
# report is merged again after every step, so a step cut short still leaves its rows.
#
# Steps, in the order of what they decide:
#   install      the checkout, editable, without the CUDA extension (seconds)
#   cuda_build   fastdit._C in the background on all cores (nvcc takes minutes; Triton work goes
#                on meanwhile); the cuda steps below wait for it only as long as the budget allows
#   info         versions, the device, every backend
#   tests        one bf16 real-shape correctness test per Triton kernel and per opt-in attention
#                variant (error budgets against float64, NaN-poisoned outputs, compile)
#   attention    S = 16384 and 32760 at D = 128 (forward and backward), the six-sample packed batch:
#                every provider side by side (torch SDPA's flash / cuDNN / efficient kernels,
#                FlexAttention, flash-attn and xformers where installed, fastdit's op on each vendor
#                kernel and on its Triton kernel with the opt-in variants), and the measured
#                attention policy for this device (OUT_DIR/attention_policy.json)
#   tests_cuda   the csrc/ kernels against the reference, once fastdit._C is built
#   memory_ops   RoPE / adaLN / gated residual at 32760 tokens x 3072: triton vs cuda per op
#   vae_ops      the five VAE conv shapes: the conv policy (written to OUT_DIR/causal_conv3d.json)
#   dit_step     Wan 2.1 1.3B at 480x832x81 against diffusers eager (when its wheel travels)
#   vae          the decode of a 21x60x104 latent (480p, 81 frames)
# Autotuning stays bounded by the compile-checked configs (6 attention tiles per kernel, 9 conv
# tiles); torch.compile providers and the cold start (minutes of compiles) are left to a later call.
#
# Returned files (<= 8): gpu_check.json (every row, the steps, the targets), gpu_check.log,
# gpu_check.png (when matplotlib is there), causal_conv3d.json (the measured conv policy),
# attention_policy.json (the measured attention policy: fastdit/ops/policies/attention-<device>.json
# once committed).
# Wheels of missing packages (diffusers, matplotlib) may be put in .whl/: they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
  [ $# -ge 1 ] || { echo "usage: $0 --dry-run OUT_DIR"; exit 2; }
fi
OUT_DIR=${1:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
BUDGET_S=${BUDGET_S:-480}
RESERVE_S=15
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
SUITES="$WORK/suites"
STEPS="$WORK/steps.tsv"
LOG="$OUT_DIR/gpu_check.log"
mkdir -p "$SUITES"
: >"$STEPS"
: >"$LOG"
export PYTHONUNBUFFERED=1 FASTDIT_CUDA_ARCHS=${FASTDIT_CUDA_ARCHS:-90a}
if [ $DRY -eq 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DEVICE=(--device cpu)
else
  DEVICE=(--device cuda)
fi
START=$SECONDS

log() { echo "$*" | tee -a "$LOG"; }

merge() {  # the report so far (again after every step)
  $PY -m fastdit.benchmarks.gpu_report "$SUITES" "$OUT_DIR/gpu_check.json" --steps "$STEPS" "$@" >>"$LOG" 2>&1
}

step() {  # step NAME CAP_S CMD...: run with a cap cut to the budget; record exit code and time
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START) - RESERVE_S))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 5 ]; then
    log "== $name: skipped, the budget is spent"
    printf '%s\t%s\t%s\t%s\n' "$name" 125 0 "skipped: budget spent" >>"$STEPS"
    return 125
  fi
  log "== $name (cap ${limit} s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local note=""
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && note="killed at its ${limit} s cap"
  log "== $name: exit $rc after $((SECONDS - t0)) s ${note}"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$note" >>"$STEPS"
  merge
  return $rc
}

if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels 60 $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl
  export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
step install 90 env FASTDIT_SKIP_CUDA_BUILD=1 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . || {
  log "install failed"
  merge --final
  exit 1
}
# fastdit._C in the background: setup.py builds it in place (the editable install finds it there)
# or says why it skips (no CUDA torch, no nvcc: the dry run).
(MAX_JOBS=${MAX_JOBS:-16} timeout -k 10 420 $PY setup.py build_ext --inplace >"$WORK/cuda_build.log" 2>&1
 echo $? >"$WORK/cuda_build.rc") &
BUILD_PID=$!

step info 30 $PY -m fastdit info

CHECK_TESTS="test_triton_cuda_bf16_real_shape_and_compile or test_fused_qk_norm_cuda_bf16_real_shape_and_compile"
CHECK_TESTS+=" or test_triton_cuda_backward_bf16 or test_cuda_bf16_error_budget_and_compile"
CHECK_TESTS+=" or test_cuda_opt_in_variants_keep_the_error_budget or test_fast_conv_cuda_bf16"
CHECK_TESTS+=" or test_vae_bf16_480p_psnr_against_fp32_reference or test_dit_cuda_bf16_and_compile"
CHECK_TESTS+=" or test_vendor_providers_cuda_bf16_parity or test_auto_runs_a_vendor_provider_on_the_gpu"
CHECK_TESTS+=" or test_vendor_providers_propagate_a_nan_query_row or test_rotary_triton_cuda_bf16_real_shape"
CHECK_TESTS+=" or test_batch_invariance_on_the_gpu"
CUDA_TESTS="test_rope3d_cuda_matches_reference or test_adaln_modulate_cuda_matches_reference"
CUDA_TESTS+=" or test_gated_residual_cuda_backend"
PYTEST=($PY -m pytest -q -rs -p no:cacheprovider -m gpu tests)
step tests 150 "${PYTEST[@]}" -k "$CHECK_TESTS"

BENCH=($PY -m fastdit bench "${DEVICE[@]}" --out "$SUITES")
if [ $DRY -eq 1 ]; then  # the CPU's small shapes: the same suites and arguments, in seconds
  ATTN=(--attn-seqlens 40 --attn-head-dims 16 --attn-heads 1)
  MEM=(--mem-grid 2,2,4)
  STEP=(--preset tiny --size 64x64x9 --text-len 16)
  VAE=(--vae-size 64x96x9)
  QUICK=(--quick)
else
  ATTN=(--attn-seqlens 16384,32760 --attn-head-dims 128)
  MEM=()
  STEP=(--preset wan2.1-1.3b --size 480x832x81 --text-len 512)
  VAE=(--vae-size 480x832x81)
  QUICK=()
fi
step attention 140 "${BENCH[@]}" --suite attention "${QUICK[@]}" "${ATTN[@]}" \
  --policy-out "$OUT_DIR/attention_policy.json"

wait_build() {  # the background build, for as long as the budget allows
  local left=$((BUDGET_S - (SECONDS - START) - RESERVE_S - 120))
  while [ ! -f "$WORK/cuda_build.rc" ] && [ "$left" -gt 0 ]; do
    sleep 5
    left=$((left - 5))
  done
  if [ -f "$WORK/cuda_build.rc" ]; then
    log "== cuda_build: exit $(cat "$WORK/cuda_build.rc"); $(grep -E 'fastdit: (building|skipping)' "$WORK/cuda_build.log" | head -1)"
    tail -n 5 "$WORK/cuda_build.log" >>"$LOG"
  else
    log "== cuda_build: still running; the cuda backend is left out of this call"
  fi
}
wait_build
step tests_cuda 60 "${PYTEST[@]}" -k "$CUDA_TESTS"
step memory_ops 100 "${BENCH[@]}" --suite memory_ops "${QUICK[@]}" "${MEM[@]}"
step vae_ops 100 "${BENCH[@]}" --suite vae_ops "${QUICK[@]}" --conv-policy-out "$OUT_DIR/causal_conv3d.json"
step dit_step 100 "${BENCH[@]}" --suite dit_step "${QUICK[@]}" "${STEP[@]}" \
  --providers fastdit-eager,fastdit-text-cached,fastdit-graph,diffusers-eager,diffusers-patched,fastdit-packed
step vae 80 "${BENCH[@]}" --suite vae "${QUICK[@]}" "${VAE[@]}" --vae-providers fastdit-eager,fastdit-triton,diffusers-eager

kill "$BUILD_PID" 2>/dev/null
merge --final --plot "$OUT_DIR/gpu_check.png"
tail -n 40 "$LOG" | sed -n '/^gpu_check on /,$p'
failed=$(awk -F'\t' '$2 != 0 {print $1}' "$STEPS" | tr '\n' ' ')
rm -rf "$WORK"
if [ -n "$failed" ]; then
  echo "FAILED steps: $failed (see $LOG)"
  exit 1
fi
echo "all steps passed"

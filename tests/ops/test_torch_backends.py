"""The ``torch`` backend of every op (PyTorch's own fused ops, the default on CPUs) and the
Triton kernels (under the interpreter on CPUs) against float64.

Each op is checked against the float64 reference at input scales 1e-3, 1 and 1e3, on packed
batches of several samples, forward and backward, with NaN / inf propagating as in the reference;
and the backend's own machinery (the cached RoPE table, the direct calls that skip the custom-op
wrapper, the CPU flash kernel's LSE and backward) against what it replaces.
"""

import pytest
import torch

from fastdit import ops
from fastdit.ops import dispatch
from tests.conftest import TRITON_ON_CPU, packed_cu, rel_err
from tests.ops.test_causal_conv3d_fast import needs_triton

LENGTHS = [5, 1, 9]
SCALES = [1e-3, 1.0, 1e3]
# Relative error of a float32 result against the float64 reference (reductions in another
# order, one rounding per product): a few float32 ulps.
FP32_REL = 2e-6


def _grid(lengths):
    """A (t, h, w) grid per sample whose volume is its length (a prime length is a 1 x 1 x n row)."""
    return torch.tensor([[1, 1, n] for n in lengths], dtype=torch.int32)


def _modulation_case(scale, dtype=torch.float32, per_token=False):
    total, batch = sum(LENGTHS), len(LENGTHS)
    rows = total if per_token else batch
    x = torch.randn(total, 40, dtype=torch.float64) * scale + 0.5 * scale
    y = torch.randn(total, 40, dtype=torch.float64) * scale
    mods = [torch.randn(rows, 40, dtype=torch.float64) for _ in range(3)]
    return x.to(dtype), y.to(dtype), [m.float() for m in mods]


def _both(fn, inputs, backend="torch"):
    """(out, grads) of ``fn`` on float leaves made of ``inputs``, for ``backend`` and for the
    reference on the same values in float64."""
    results = []
    for name, cast in ((backend, lambda t: t), ("reference", lambda t: t.double())):
        leaves = [cast(t).detach().requires_grad_() for t in inputs]
        outs = fn(*leaves, backend=name)
        outs = outs if isinstance(outs, tuple) else (outs,)
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
        loss = sum((o.double() * w.double()).sum() for o, w in zip(outs, weights))
        results.append(([o.detach() for o in outs], torch.autograd.grad(loss, leaves)))
    return results


def _assert_close(got, want, rel):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) <= rel, (rel_err(g, w), rel)


FAST_BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("per_token", [False, True])
def test_adaln_modulate_torch_matches_float64(backend, scale, norm, per_token):
    """The torch backend and the Triton kernel (interpreted on CPUs) with eps 1e-3. Catches a
    per-sample row applied to the wrong sample (the gather over cu_seqlens), a norm without the
    eps or with eps outside the square root (0.4 relative error at scale 1e-3, 5e-7 at 1), an
    affine weight applied after the modulation."""
    x, _, (shift, scale_row, _) = _modulation_case(scale, per_token=per_token)
    weight = torch.randn(40)
    cu = packed_cu(LENGTHS)

    def fn(x, shift, scale_row, weight, backend):
        return ops.adaln_modulate(x, shift, scale_row, cu, norm=norm, eps=1e-3, weight=weight, backend=backend)

    (got, got_grads), (want, want_grads) = _both(fn, [x, shift, scale_row, weight], backend)
    _assert_close(got, want, FP32_REL)
    _assert_close(got_grads, want_grads, 1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("per_token", [False, True])
def test_gated_residuals_torch_match_float64(backend, scale, per_token):
    """Catches the gate multiplying the residual instead of y, the fused pair normalising the
    unrounded sum, a non-default eps ignored."""
    x, y, (gate, shift, scale_row) = _modulation_case(scale, per_token=per_token)
    cu = packed_cu(LENGTHS)

    def fused(x, y, gate, shift, scale_row, backend):
        return ops.gated_residual_modulate(x, y, gate, shift, scale_row, cu, eps=1e-2, backend=backend)

    (got, got_grads), (want, want_grads) = _both(fused, [x, y, gate, shift, scale_row], backend)
    _assert_close(got, want, FP32_REL)
    _assert_close(got_grads, want_grads, 1e-5)
    (got, _), (want, _) = _both(lambda x, y, g, backend: ops.gated_residual(x, y, g, cu, backend=backend), [x, y, gate],
                                backend)  # fmt: skip
    _assert_close(got, want, FP32_REL)


@pytest.mark.parametrize("scale", SCALES)
def test_modulations_without_autograd_match_float64(scale):
    """The no-grad path (one addcmul pass instead of the mul + add autograd sees): catches its
    operands swapped (shift times the norm plus the scale) or the residual and y exchanged, which
    the gradient tests above never reach."""
    x, y, (gate, shift, scale_row) = _modulation_case(scale)
    cu = packed_cu(LENGTHS)
    calls = {
        "adaln_modulate": lambda t, b: ops.adaln_modulate(t[0], t[3], t[4], cu, norm="rms", eps=1e-3, backend=b),
        "gated_residual": lambda t, b: ops.gated_residual(t[0], t[1], t[2], cu, backend=b),
        "gated_residual_modulate": lambda t, b: ops.gated_residual_modulate(*t, cu, eps=1e-2, backend=b),
    }
    inputs = (x, y, gate, shift, scale_row)
    for call in calls.values():
        with torch.no_grad():
            got = call(inputs, "torch")
        want = call(tuple(t.double() for t in inputs), "reference")
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        _assert_close(got, want, FP32_REL)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
def test_rms_norms_torch_match_float64(backend, scale):
    """Catches the one-pass RMSNorm's mean over the wrong count (sum / C), eps added after the
    square root, the VAE norm's sqrt(C) gain folded in twice."""
    x = torch.randn(23, 40) * scale
    weight = torch.randn(40)
    (got, got_grads), (want, want_grads) = _both(lambda x, w, backend: ops.rms_norm(x, w, eps=1e-4, backend=backend),
                                                 [x, weight], backend)  # fmt: skip
    _assert_close(got, want, FP32_REL)
    _assert_close(got_grads, want_grads, 1e-5)
    video = torch.randn(2, 8, 3, 4, 5) * scale
    gamma = torch.rand(8) + 0.5

    def norm_silu(v, g, backend):
        return ops.rms_norm_silu(v, g, eps=1e-3, backend=backend)

    (got, got_grads), (want, want_grads) = _both(norm_silu, [video, gamma], backend)
    _assert_close(got, want, FP32_REL)
    _assert_close(got_grads, want_grads, 1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope3d_torch_matches_float64(backend, scale, interleaved):
    """Catches the complex multiply pairing (i, i + D/2) instead of (2i, 2i+1), a table of another
    grid or offset reused from the cache, the conjugate (backward) rotation not applied."""
    cu, grid = packed_cu(LENGTHS), _grid(LENGTHS)
    offset = torch.tensor([0, 3, 2], dtype=torch.int32)
    q, k = torch.randn(sum(LENGTHS), 4, 24) * scale, torch.randn(sum(LENGTHS), 2, 24) * scale

    def fn(q, k, backend):
        return ops.rope3d_qk(q, k, grid, cu, interleaved=interleaved, token_offset=offset, backend=backend)

    (got, got_grads), (want, want_grads) = _both(fn, [q, k], backend)
    _assert_close(got, want, FP32_REL)
    _assert_close(got_grads, want_grads, FP32_REL)
    plain = ops.rope3d_qk(q, k, grid, cu, interleaved=interleaved, backend=backend)  # another key: offsets 0
    want_plain = ops.rope3d_qk(q.double(), k.double(), grid, cu, interleaved=interleaved, backend="reference")
    _assert_close(plain, want_plain, FP32_REL)
    assert rel_err(plain[0], got[0]) > 1e-3  # the offset changed the angles


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
def test_fused_qk_norm_rope_torch_matches_float64(backend, scale):
    """q / k RMSNorm (eps 1e-3) fused with RoPE. Catches eps outside the square root (scale 1e-3),
    the norm taken per head instead of across heads, the weight applied after the rotation."""
    cu, grid = packed_cu(LENGTHS), _grid(LENGTHS)
    q, k = torch.randn(sum(LENGTHS), 4, 24) * scale, torch.randn(sum(LENGTHS), 4, 24) * scale
    wq, wk = torch.randn(96), torch.randn(96)

    def fn(q, k, wq, wk, backend):
        return ops.rope3d_qk(q, k, grid, cu, q_norm_weight=wq, k_norm_weight=wk, norm_eps=1e-3, backend=backend)

    (got, got_grads), (want, want_grads) = _both(fn, [q, k, wq, wk], backend)
    _assert_close(got, want, FP32_REL)
    _assert_close(got_grads, want_grads, 1e-5)


def test_rope_table_built_in_inference_mode_serves_training():
    """Catches a cached table made inside ``inference_mode``: autograd cannot save an inference
    tensor, so a later training call on the same grid would raise."""
    cu, grid = packed_cu([6]), torch.tensor([[1, 2, 3]], dtype=torch.int32)
    x = torch.randn(6, 2, 12)
    with torch.inference_mode():
        ops.rope3d(x, grid, cu, backend="torch", theta=123.0)
    leaf = x.clone().requires_grad_()
    ops.rope3d(leaf, grid, cu, backend="torch", theta=123.0).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_torch_matches_float64(backend, scale, causal):
    """Catches a sample attending to another's keys, causal masks aligned top-left when Lq != Lk
    (bottom-right is the contract: queries past the keys see none, out 0 and lse -inf), GQA heads
    repeated in the wrong order, an LSE in another layout."""
    lengths_q, lengths_k = [5, 9, 2], [3, 9, 6]  # Lq > Lk, equal, Lq < Lk
    q = torch.randn(sum(lengths_q), 4, 16) * scale
    k, v = torch.randn(sum(lengths_k), 2, 16) * scale, torch.randn(sum(lengths_k), 2, 16)
    cu_q, cu_k = packed_cu(lengths_q), packed_cu(lengths_k)

    def fn(q, k, v, backend):
        return ops.varlen_attention(q, k, v, cu_q, cu_k, 9, 9, causal=causal, return_lse=True, backend=backend)

    (got, got_grads), (want, want_grads) = _both(fn, [q, k, v], backend)
    finite = torch.isfinite(want[1])
    assert torch.equal(torch.isinf(got[1]), ~finite) and got[1].dtype == torch.float32
    # At scale 1e3 the scores reach ~1e6 and the softmax saturates: float32 itself cannot do
    # better there, so the bar is the float32 reference's own error (the flash-attn rule, 2x).
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out32, lse32 = fn(*leaves, backend="reference")
    grads32 = torch.autograd.grad(out32, leaves, torch.randn(out32.shape, generator=torch.Generator().manual_seed(0)))
    pairs = [(got[0], out32, want[0]), (got[1][finite], lse32[finite], want[1][finite])]
    pairs += list(zip(got_grads, grads32, want_grads))
    for mine, theirs, exact in pairs:
        assert rel_err(mine, exact) <= max(2 * rel_err(theirs, exact), 1e-5)


def test_attention_backward_form_with_a_global_lse_is_the_block_share():
    """Ring attention splits keys into blocks and feeds each block's backward the merged output and
    LSE: the two blocks' (dq) must add up to the whole attention's, and each dk / dv is the block's."""
    q = torch.randn(7, 2, 8, requires_grad=True)
    k, v = torch.randn(10, 2, 8, requires_grad=True), torch.randn(10, 2, 8, requires_grad=True)
    cu_q, cu_k, cu_half = packed_cu([7]), packed_cu([10]), packed_cu([5])
    out, lse = ops.varlen_attention(q, k, v, cu_q, cu_k, 7, 10, return_lse=True, backend="torch")
    dout = torch.randn_like(out)
    dq_all, dk_all, dv_all = torch.autograd.grad(out, (q, k, v), dout)
    dq = torch.zeros_like(q)
    for part in (slice(0, 5), slice(5, 10)):
        dq_b, dk_b, dv_b = ops.varlen_attention_backward(dout, q, k[part], v[part], out, lse, cu_q, cu_half, 7, 5,
                                                         backend="torch")  # fmt: skip
        dq = dq + dq_b
        torch.testing.assert_close(dk_b, dk_all[part], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dv_b, dv_all[part], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dq, dq_all, rtol=1e-5, atol=1e-6)


def test_inference_calls_skip_the_custom_op_and_compute_the_same():
    """Catches the direct (no-grad) path and the custom op (autograd) drifting apart."""
    q, k, v = torch.randn(2, 9, 4, 16), torch.randn(2, 9, 4, 16), torch.randn(2, 9, 4, 16)
    with torch.no_grad():
        direct = ops.attention(q, k, v, causal=True, backend="torch")
    tracked = ops.attention(q.requires_grad_(), k, v, causal=True, backend="torch")
    assert torch.equal(direct, tracked.detach())


NAN_CASES = {
    "adaln_modulate": lambda x, cu, b: ops.adaln_modulate(x, torch.zeros(3, 8), torch.zeros(3, 8), cu, backend=b),
    "gated_residual": lambda x, cu, b: ops.gated_residual(x, x, torch.ones(3, 8), cu, backend=b),
    "rms_norm": lambda x, cu, b: ops.rms_norm(x, backend=b),
    "rope3d": lambda x, cu, b: ops.rope3d(x.view(-1, 2, 4), _grid(LENGTHS), cu, backend=b),
}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("name", list(NAN_CASES))
def test_nan_and_inf_propagate_as_in_the_reference(backend, name):
    """Catches a fast path that hides a NaN / inf (a max-subtracted norm, a clamp) or spreads one
    to other tokens (a shared statistic)."""
    x = torch.randn(sum(LENGTHS), 8)
    x[2, 3], x[7, 0] = float("nan"), float("inf")
    cu = packed_cu(LENGTHS)
    with torch.no_grad():
        got, want = NAN_CASES[name](x, cu, backend), NAN_CASES[name](x, cu, "reference")
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)


def test_cpu_dispatch_picks_the_torch_backend_never_the_oracle():
    """Catches the 2026-12-05 regression: on a CPU every op ran its float32 reference oracle, so
    fastdit was slower than the PyTorch code it replaces."""
    cpu = torch.device("cpu")
    for op in dispatch.ops():
        chosen = dispatch.device_choice(op, cpu, torch.float32)
        assert chosen == ("cudnn" if op == "causal_conv3d" else "torch"), (op, chosen)


@pytest.mark.bad_input
@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs Triton's interpreter (TRITON_INTERPRET=1 on a CPU)")
def test_bfloat16_under_the_triton_interpreter_is_refused_by_name():
    """numpy has no bfloat16, so the interpreted kernels returned garbage for it: catches the
    refusal missing from any op's Triton backend (all register through one helper)."""
    x = torch.randn(6, 8, dtype=torch.bfloat16)
    calls = {
        "rms_norm": lambda: ops.rms_norm(x, backend="triton"),
        "adaln_modulate": lambda: ops.adaln_modulate(x, x[:1], x[:1], packed_cu([6]), backend="triton"),
        "attention": lambda: ops.attention(
            *(torch.randn(1, 6, 2, 16, dtype=torch.bfloat16) for _ in range(3)), backend="triton"
        ),  # fmt: skip
    }
    for call in calls.values():
        with pytest.raises(dispatch.BackendNotSupportedError, match="bfloat16 under TRITON_INTERPRET=1"):
            call()

"""gated_residual and gated_residual_modulate against independent float64 math: every backend,
per sample and per token, packed and dense, bad input and the cuda kernel (emulated on CPU by
tests/ops/test_cuda_emulation.py, real with -m gpu). The kernels they share with adaln_modulate
are checked together in test_adaln_modulate.py (gradcheck, opcheck, compile)."""

import pytest
import torch

from fastdit import ops
from tests.conftest import packed_cu
from tests.ops.test_adaln_modulate import LENGTHS, TOL, _cuda_ext_missing, modulate_oracle, residual_oracle
from tests.ops.tolerances import gated_residual_tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_gated_residual_matches_oracle(dtype, lengths):
    total, channels = sum(lengths), 73
    res, y = torch.randn(total, channels, dtype=dtype), torch.randn(total, channels, dtype=dtype)
    gate = torch.randn(len(lengths), channels)
    out = ops.gated_residual(res, y, gate, packed_cu(lengths))
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.double(), residual_oracle(res, y, gate, lengths), atol=TOL[dtype] * 10, rtol=TOL[dtype]
    )


def test_gated_residual_per_token_and_dense():
    res, y, gate = torch.randn(2, 5, 24), torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    out = ops.gated_residual(res, y, gate)
    torch.testing.assert_close(out, res + y * gate)
    out_b1c = ops.gated_residual(res, y, gate[:, :1])
    torch.testing.assert_close(out_b1c, res + y * gate[:, :1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_gated_residual_modulate_equals_unfused_sequence(dtype, norm):
    lengths, channels = [3, 8, 1], 40
    total, batch = sum(lengths), len(lengths)
    res, y = torch.randn(total, channels, dtype=dtype), torch.randn(total, channels, dtype=dtype)
    gate, shift, scale = (torch.randn(batch, channels) for _ in range(3))
    cu = packed_cu(lengths)
    r, mod = ops.gated_residual_modulate(res, y, gate, shift, scale, cu, norm=norm)
    r_expect = residual_oracle(res, y, gate, lengths)
    torch.testing.assert_close(r.double(), r_expect, atol=TOL[dtype] * 10, rtol=TOL[dtype])
    # The norm reads r rounded to the model dtype, as the unfused pair does.
    mod_expect = modulate_oracle(r, shift, scale, lengths, norm=norm)
    torch.testing.assert_close(mod.double(), mod_expect, atol=TOL[dtype] * 10, rtol=TOL[dtype])


@pytest.mark.bad_input
def test_gated_residual_bad_input():
    cu = packed_cu([2, 3])
    with pytest.raises(ValueError, match="y must have the shape of res"):
        ops.gated_residual(torch.randn(5, 8), torch.randn(4, 8), torch.randn(2, 8), cu)
    with pytest.raises(ValueError, match="gate must be per sample"):
        ops.gated_residual(torch.randn(5, 8), torch.randn(5, 8), torch.randn(3, 8), cu)
    with pytest.raises(ValueError, match="must equal the number of packed tokens"):
        ops.gated_residual(torch.randn(5, 8), torch.randn(5, 8), torch.randn(2, 8), packed_cu([2, 2]))
    with pytest.raises(ValueError, match="all be per sample .* or all per token"):
        ops.gated_residual_modulate(
            torch.randn(5, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 8), torch.randn(5, 8), cu
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or _cuda_ext_missing() is not None, reason="fastdit._C not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("channels", [1536, 5120, 73])  # 73: the scalar (unvectorized) path
def test_gated_residual_cuda_backend(dtype, channels):
    lengths = [32760, 1, 517]
    cu = packed_cu(lengths).cuda()
    res = torch.randn(sum(lengths), channels, device="cuda", dtype=dtype)
    y = torch.randn_like(res)
    gate = torch.randn(3, channels, device="cuda")
    assert (
        ops.backends("gated_residual")["cuda"].not_supported_reasons(
            {"device": res.device, "dtype": dtype, "y_dtype": dtype}
        )
        == []
    )
    out = ops.gated_residual(res, y, gate, cu, backend="cuda")
    ref = ops.gated_residual(res, y, gate, cu, backend="reference")
    # Same fp32 math up to FMA contraction (tests/ops/tolerances.py).
    torch.testing.assert_close(out, ref, **gated_residual_tolerance(res, y, gate))
    per_token = torch.randn(sum(lengths), channels, device="cuda")
    torch.testing.assert_close(
        ops.gated_residual(res, y, per_token, backend="cuda"),
        ops.gated_residual(res, y, per_token, backend="reference"),
        **gated_residual_tolerance(res, y, per_token),
    )
    compiled = torch.compile(lambda a, b: ops.gated_residual(a, b, gate, cu, backend="cuda"), fullgraph=True)
    torch.testing.assert_close(compiled(res, y), out, atol=0, rtol=0)  # the same kernel on the same data


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or _cuda_ext_missing() is not None, reason="fastdit._C not built")
def test_gated_residual_cuda_opcheck_and_backward():
    cu = packed_cu([5, 3]).cuda()
    res = torch.randn(8, 64, device="cuda", requires_grad=True)
    y = torch.randn(8, 64, device="cuda", requires_grad=True)
    gate = torch.randn(2, 64, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.fastdit.gated_residual_cuda.default, (res, y, gate, cu))
    grads = torch.autograd.grad(ops.gated_residual(res, y, gate, cu, backend="cuda").sum(), (res, y, gate))
    expect = torch.autograd.grad(ops.gated_residual(res, y, gate, cu, backend="reference").sum(), (res, y, gate))
    for got, want in zip(grads, expect):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or _cuda_ext_missing() is not None, reason="fastdit._C not built")
def test_gated_residual_cuda_past_int32_offsets():
    # 1.4M tokens x 1536 channels = 2.15e9 elements > 2^31: offsets must be 64-bit.
    rows, channels = 1_400_000, 1536
    cu = torch.tensor([0, 700_000, rows], dtype=torch.int32, device="cuda")
    res = torch.randn(rows, channels, device="cuda", dtype=torch.bfloat16)
    y = torch.randn_like(res)
    gate = torch.randn(2, channels, device="cuda")
    out = ops.gated_residual(res, y, gate, cu, backend="cuda")
    tail = slice(rows - 1000, rows)
    expect = (res[tail].float() + y[tail].float() * gate[1]).bfloat16()
    torch.testing.assert_close(out[tail], expect, **gated_residual_tolerance(res[tail], y[tail], gate[1]))

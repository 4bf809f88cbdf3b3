"""adaln_modulate, gated_residual and gated_residual_modulate against independent float64 math."""

import pytest
import torch
import torch.nn.functional as F

from fastdit import ops
from fastdit.ops.adaln_modulate import adaln_modulate_reference
from fastdit.ops.gated_residual import gated_residual_modulate_reference, gated_residual_reference
from tests.conftest import packed_cu
from tests.ops.tolerances import gated_residual_tolerance

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3}
LENGTHS = [[7], [5, 1, 9], [3, 11]]  # a single-token sample among others
CHANNELS = [24, 40, 73]  # 73: not a power of two, odd


def modulate_oracle(x, shift, scale, lengths, *, norm="layer", eps=1e-6, weight=None, bias=None, per_token=False):
    """Per sample, torch.nn.functional norms in float64."""
    out, start = [], 0
    for b, n in enumerate(lengths):
        xb = x[start : start + n].double()
        w = None if weight is None else weight.double()
        if norm == "layer":
            nb = F.layer_norm(xb, (x.shape[-1],), w, None if bias is None else bias.double(), eps)
        else:
            nb = F.rms_norm(xb, (x.shape[-1],), w, eps)
        sh = shift[start : start + n] if per_token else shift[b : b + 1]
        sc = scale[start : start + n] if per_token else scale[b : b + 1]
        out.append(nb * (1 + sc.double()) + sh.double())
        start += n
    return torch.cat(out)


def residual_oracle(res, y, gate, lengths, per_token=False):
    out, start = [], 0
    for b, n in enumerate(lengths):
        g = gate[start : start + n] if per_token else gate[b : b + 1]
        out.append(res[start : start + n].double() + y[start : start + n].double() * g.double())
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_adaln_modulate_matches_oracle(dtype, channels, lengths, norm):
    total, batch = sum(lengths), len(lengths)
    x = torch.randn(total, channels, dtype=dtype) * 3 + 1
    shift, scale = torch.randn(batch, channels), torch.randn(batch, channels)
    out = ops.adaln_modulate(x, shift, scale, packed_cu(lengths), norm=norm)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.double(), modulate_oracle(x, shift, scale, lengths, norm=norm), atol=TOL[dtype] * 10, rtol=TOL[dtype]
    )


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_adaln_modulate_affine_and_per_token(norm):
    lengths, channels = [4, 6], 40
    x = torch.randn(10, channels, dtype=torch.float64)
    shift, scale = torch.randn(10, channels, dtype=torch.float64), torch.randn(10, channels, dtype=torch.float64)
    weight = torch.randn(channels, dtype=torch.float64)
    bias = torch.randn(channels, dtype=torch.float64) if norm == "layer" else None
    out = ops.adaln_modulate(x, shift, scale, packed_cu(lengths), norm=norm, weight=weight, bias=bias, eps=1e-5)
    expect = modulate_oracle(x, shift, scale, lengths, norm=norm, eps=1e-5, weight=weight, bias=bias, per_token=True)
    torch.testing.assert_close(out, expect, atol=1e-10, rtol=1e-10)


def test_adaln_modulate_dense_forms_equal_packed():
    x = torch.randn(2, 6, 24)
    shift, scale = torch.randn(2, 24), torch.randn(2, 24)
    packed = ops.adaln_modulate(x.reshape(12, 24), shift, scale, packed_cu([6, 6]))
    torch.testing.assert_close(ops.adaln_modulate(x, shift, scale).reshape(12, 24), packed, atol=0, rtol=0)
    dense_b1c = ops.adaln_modulate(x, shift[:, None], scale[:, None])
    torch.testing.assert_close(dense_b1c.reshape(12, 24), packed, atol=0, rtol=0)
    per_token = ops.adaln_modulate(x, shift[:, None].expand(2, 6, 24), scale[:, None].expand(2, 6, 24))
    torch.testing.assert_close(per_token.reshape(12, 24), packed, atol=0, rtol=0)


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


def test_gradcheck_modulation_ops():
    lengths, channels = [2, 3], 6
    cu = packed_cu(lengths)
    d = dict(dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(5, channels, **d), torch.randn(5, channels, **d)
    shift, scale, gate = (torch.randn(2, channels, **d) for _ in range(3))
    weight, bias = torch.randn(channels, **d), torch.randn(channels, **d)
    tok = torch.randn(5, channels, **d)
    assert torch.autograd.gradcheck(
        lambda *a: ops.adaln_modulate(a[0], a[1], a[2], cu, weight=a[3], bias=a[4]), (x, shift, scale, weight, bias)
    )
    assert torch.autograd.gradcheck(lambda *a: ops.adaln_modulate(*a, cu, norm="rms", weight=weight), (x, shift, scale))
    assert torch.autograd.gradcheck(
        lambda *a: ops.adaln_modulate(*a, cu), (x, tok, tok.detach().clone().requires_grad_())
    )
    assert torch.autograd.gradcheck(lambda *a: ops.gated_residual(*a, cu), (x, y, gate))
    assert torch.autograd.gradcheck(lambda *a: ops.gated_residual(*a, cu), (x, y, tok))
    assert torch.autograd.gradcheck(lambda *a: ops.gated_residual_modulate(*a, cu), (x, y, gate, shift, scale))
    assert torch.autograd.gradcheck(
        lambda *a: ops.gated_residual_modulate(*a, cu, norm="rms"), (x, y, gate, shift, scale)
    )


def test_opcheck_modulation_ops():
    cu = packed_cu([2, 3])
    x, y = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    shift, scale, gate = (torch.randn(2, 8, requires_grad=True) for _ in range(3))
    weight, bias = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    torch.library.opcheck(adaln_modulate_reference, (x, shift, scale, cu, "layer", 1e-6, weight, bias))
    torch.library.opcheck(adaln_modulate_reference, (x, x.detach(), x.detach(), None, "rms", 1e-6, None, None))
    torch.library.opcheck(gated_residual_reference, (x, y, gate, cu))
    torch.library.opcheck(gated_residual_reference, (x, y, y.detach(), None))
    torch.library.opcheck(gated_residual_modulate_reference, (x, y, gate, shift, scale, cu, "layer", 1e-6))


def test_modulation_ops_compiled_match_eager():
    cu = packed_cu([3, 4])
    x, y = torch.randn(7, 24), torch.randn(7, 24)
    shift, scale, gate = (torch.randn(2, 24) for _ in range(3))

    def fn(x, y):
        r, m = ops.gated_residual_modulate(x, y, gate, shift, scale, cu)
        return ops.gated_residual(r, m, gate, cu), ops.adaln_modulate(m, shift, scale, cu, norm="rms")

    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(x, y), fn(x, y)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(shift=torch.randn(3, 8)), ValueError, "shift must be per sample"),
        (dict(scale=torch.randn(2, 9)), ValueError, "scale must have C = 8"),
        (dict(scale=torch.randn(5, 8)), ValueError, "both be per sample .* or both per token"),
        (dict(norm="group"), ValueError, "norm must be one of"),
        (dict(eps=0.0), ValueError, "eps must be a positive"),
        (dict(weight=torch.randn(7)), ValueError, r"weight must have shape \(C,\)"),
        (dict(norm="rms", bias=torch.randn(8)), ValueError, "bias is not defined for norm='rms'"),
        (dict(x=torch.randn(5, 8).long()), TypeError, "x must have dtype"),
        (dict(cu_seqlens=torch.tensor([0, 3, 2], dtype=torch.int32)), ValueError, "non-decreasing"),
        (dict(shift=torch.randn(2, 8, dtype=torch.float64).to("meta")), ValueError, "shift is on meta"),
    ],
)
@pytest.mark.bad_input
def test_adaln_modulate_bad_input(kwargs, error, match):
    args = dict(x=torch.randn(5, 8), shift=torch.randn(2, 8), scale=torch.randn(2, 8), cu_seqlens=packed_cu([2, 3]))
    for key in ("x", "shift", "scale", "cu_seqlens"):
        if key in kwargs:
            args[key] = kwargs.pop(key)
    with pytest.raises(error, match=match):
        ops.adaln_modulate(args["x"], args["shift"], args["scale"], args["cu_seqlens"], **kwargs)


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


def _cuda_ext_missing():
    from fastdit._extension import cuda_extension_missing

    return cuda_extension_missing()


@pytest.mark.gpu
def test_modulation_reference_cuda_bf16_real_shape():
    lengths, channels = [32760, 3600, 1], 1536
    cu = packed_cu(lengths).cuda()
    x = torch.randn(sum(lengths), channels, device="cuda").bfloat16()
    shift, scale = torch.randn(3, channels, device="cuda"), torch.randn(3, channels, device="cuda")
    out = ops.adaln_modulate(x, shift, scale, cu, backend="reference")
    expect = modulate_oracle(x.cpu(), shift.cpu(), scale.cpu(), lengths)
    assert ((out.cpu().double() - expect).norm() / expect.norm()).item() < 4e-3


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

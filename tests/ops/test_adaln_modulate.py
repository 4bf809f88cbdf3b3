"""adaln_modulate against independent float64 math, and the checks its kernels share with
gated_residual / gated_residual_modulate (gradcheck, opcheck, compile); those ops' own tests are in
test_gated_residual.py."""

import pytest
import torch
import torch.nn.functional as F

from fastdit import ops
from fastdit.ops.adaln_modulate import adaln_modulate_reference
from fastdit.ops.gated_residual import gated_residual_modulate_reference, gated_residual_reference
from tests.conftest import packed_cu

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


# The reference's custom ops are opaque to the compiler (bitwise); inductor fuses the torch
# backend's aten ops (the last bits may round differently). Catches a backend that breaks the
# graph (fullgraph) or computes something else when traced.
COMPILED_TOLERANCE = {"reference": 0.0, "torch": 1e-5}
# The trace is what these check on a CPU: aot_eager runs the traced graph without inductor's C++
# code generation (seconds per kernel here; the GPU tests compile with inductor).
CPU_COMPILER = "aot_eager"


@pytest.mark.parametrize("backend", list(COMPILED_TOLERANCE))
def test_modulation_ops_compiled_match_eager(backend):
    cu = packed_cu([3, 4])
    x, y = torch.randn(7, 24), torch.randn(7, 24)
    shift, scale, gate = (torch.randn(2, 24) for _ in range(3))

    def fn(x, y):
        r, m = ops.gated_residual_modulate(x, y, gate, shift, scale, cu, backend=backend)
        return (ops.gated_residual(r, m, gate, cu, backend=backend),
                ops.adaln_modulate(m, shift, scale, cu, norm="rms", backend=backend))  # fmt: skip

    compiled = torch.compile(fn, fullgraph=True, backend=CPU_COMPILER)
    tol = COMPILED_TOLERANCE[backend]
    for got, want in zip(compiled(x, y), fn(x, y)):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


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

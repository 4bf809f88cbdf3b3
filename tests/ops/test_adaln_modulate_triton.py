"""The triton backend of adaln_modulate, gated_residual and gated_residual_modulate
(CPU: under TRITON_INTERPRET=1; GPU: -m gpu)."""

import pytest
import torch

from fastdit import ops
from tests.conftest import CPU_BACKENDS, packed_cu, rel_err
from tests.ops.test_adaln_modulate import modulate_oracle
from tests.ops.tolerances import gated_residual_tolerance

# CPU tests run the kernels under TRITON_INTERPRET=1; -m gpu tests run them on CUDA.
pytestmark = [
    pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not installed"),
    pytest.mark.triton_cpu,
]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
LENGTHS = [[7], [5, 1, 9], [1, 1, 4, 2]]
CHANNELS = [24, 73, 1536]
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration", "test_faketensor")
    if not torch.cuda.is_available()
    else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_adaln_modulate_triton_forward(dtype, channels, lengths, norm, poison_outputs):
    total, batch = sum(lengths), len(lengths)
    x = (torch.randn(total, channels) * 3 + 1).to(dtype)
    shift, scale = torch.randn(batch, channels), torch.randn(batch, channels)
    out = ops.adaln_modulate(x, shift, scale, packed_cu(lengths), norm=norm, backend="triton")
    expect = modulate_oracle(x, shift, scale, lengths, norm=norm)
    torch.testing.assert_close(out.double(), expect, atol=TOL[dtype] * 10, rtol=TOL[dtype])


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_adaln_modulate_triton_affine_per_token_dense(norm, poison_outputs):
    x = torch.randn(2, 6, 40)
    shift, scale = torch.randn(2, 6, 40), torch.randn(2, 6, 40)
    weight = torch.randn(40)
    bias = torch.randn(40) if norm == "layer" else None
    out = ops.adaln_modulate(x, shift, scale, norm=norm, weight=weight, bias=bias, backend="triton")
    expect = modulate_oracle(
        x.reshape(12, 40), shift.reshape(12, 40), scale.reshape(12, 40), [6, 6], norm=norm, weight=weight,
        bias=bias, per_token=True,
    )  # fmt: skip
    torch.testing.assert_close(out.reshape(12, 40).double(), expect, atol=1e-5, rtol=1e-5)


def _check_grads(fn, inputs, weights):
    """Gradients of sum(out_i * w_i) through the triton backend vs the reference in float64."""

    def grads(backend, tensors):
        outs = fn(*tensors, backend=backend)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return torch.autograd.grad(sum((o.double() * w).sum() for o, w in zip(outs, weights)), tensors)

    doubles = [t.detach().double().requires_grad_() for t in inputs]
    for got, want in zip(grads("triton", inputs), grads("reference", doubles)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_triton_backward_matches_float64(per_token, norm):
    lengths, channels = [5, 1, 9, 3], 73
    total = sum(lengths)
    cu = packed_cu(lengths)
    rows = total if per_token else len(lengths)
    leaf = lambda *shape: torch.randn(*shape).requires_grad_()
    res, y = leaf(total, channels), leaf(total, channels)
    gate, shift, scale = leaf(rows, channels), leaf(rows, channels), leaf(rows, channels)
    weight, bias = leaf(channels), leaf(channels)
    w1, w2 = (torch.randn(total, channels, dtype=torch.float64) for _ in range(2))

    def adaln(x, sh, sc, w, *b, backend):
        return ops.adaln_modulate(x, sh, sc, cu, norm=norm, weight=w, bias=b[0] if b else None, backend=backend)

    affine = [weight, bias] if norm == "layer" else [weight]
    _check_grads(adaln, [res, shift, scale, *affine], [w1])
    _check_grads(lambda x, sh, sc, backend: ops.adaln_modulate(x, sh, sc, cu, norm=norm, backend=backend),
                 [res, shift, scale], [w1])  # fmt: skip
    _check_grads(lambda *a, backend: ops.gated_residual(*a, cu, backend=backend), [res, y, gate], [w1])
    _check_grads(
        lambda *a, backend: ops.gated_residual_modulate(*a, cu, norm=norm, backend=backend),
        [res, y, gate, shift, scale],
        [w1, w2],
    )


def test_triton_opcheck():
    from fastdit.ops.adaln_modulate import adaln_modulate_triton
    from fastdit.ops.gated_residual import gated_residual_modulate_triton, gated_residual_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cu = packed_cu([2, 3], device=device)
    x, y = (torch.randn(5, 24, device=device, requires_grad=True) for _ in range(2))
    shift, scale, gate = (torch.randn(2, 24, device=device, requires_grad=True) for _ in range(3))
    weight, bias = (torch.randn(24, device=device, requires_grad=True) for _ in range(2))
    opcheck = lambda op, args: torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)
    opcheck(adaln_modulate_triton, (x, shift, scale, cu, "layer", 1e-6, weight, bias))
    opcheck(adaln_modulate_triton, (x, y.detach(), y.detach(), None, "rms", 1e-6, None, None))
    opcheck(gated_residual_triton, (x, y, gate, cu))
    opcheck(gated_residual_modulate_triton, (x, y, gate, shift, scale, cu, "layer", 1e-6))


def test_triton_not_picked_on_cpu_unless_forced():
    for op in ("adaln_modulate", "gated_residual", "gated_residual_modulate"):
        inputs = {"device": torch.device("cpu"), "dtype": torch.float32, "y_dtype": torch.float32}
        assert ops.select_backend(op, inputs).name == "torch"  # PyTorch's own ops, not the oracle
        assert ops.select_backend(op, inputs, backend="triton").name == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [1536, 3072, 5120])
def test_triton_cuda_bf16_real_shape_and_compile(channels):
    lengths = [32760, 3600, 1]
    cu = packed_cu(lengths).cuda()
    res = torch.randn(sum(lengths), channels, device="cuda").bfloat16()
    y = torch.randn_like(res)
    gate, shift, scale = (torch.randn(3, channels, device="cuda") for _ in range(3))
    r, mod = ops.gated_residual_modulate(res, y, gate, shift, scale, cu, backend="triton")
    ref_r, ref_mod = ops.gated_residual_modulate(res, y, gate, shift, scale, cu, backend="reference")
    torch.testing.assert_close(r, ref_r, **gated_residual_tolerance(res, y, gate))
    assert rel_err(mod.float(), ref_mod.float()) < 4e-3
    out = ops.adaln_modulate(res, shift, scale, cu, backend="triton")
    assert rel_err(out.float(), ops.adaln_modulate(res, shift, scale, cu, backend="reference").float()) < 4e-3
    compiled = torch.compile(
        lambda a, b: ops.gated_residual_modulate(a, b, gate, shift, scale, cu, backend="triton"), fullgraph=True
    )
    for got, want in zip(compiled(res, y), (r, mod)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.gpu
def test_triton_cuda_backward_bf16():
    lengths, channels = [4096, 1, 700], 3072
    cu = packed_cu(lengths).cuda()
    x = torch.randn(sum(lengths), channels, device="cuda").bfloat16().requires_grad_()
    shift, scale = (torch.randn(3, channels, device="cuda", requires_grad=True) for _ in range(2))
    g = torch.randn(sum(lengths), channels, device="cuda").bfloat16()
    got = torch.autograd.grad(ops.adaln_modulate(x, shift, scale, cu, backend="triton"), (x, shift, scale), g)
    want = torch.autograd.grad(ops.adaln_modulate(x, shift, scale, cu, backend="reference"), (x, shift, scale), g)
    for a, b in zip(got, want):
        assert rel_err(a.float(), b.float()) < 1e-2

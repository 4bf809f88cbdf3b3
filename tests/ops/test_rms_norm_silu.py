"""rms_norm_silu (the Wan VAE's RMS norm over channels, with SiLU): every backend against a
float64 oracle, gradients, opcheck and bad input (CPU: Triton under TRITON_INTERPRET=1)."""

import pytest
import torch

from fastdit import ops
from fastdit.ops.rms_norm_silu import rms_norm_silu_reference
from tests.ops.test_causal_conv3d_fast import OPCHECK_UTILS, TOL, needs_triton


def norm_silu_oracle(x, gamma, silu=True, eps=1e-12):
    x = x.double()
    norm = x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(eps)
    y = x / norm * x.shape[1] ** 0.5 * gamma.double().reshape(1, -1, *([1] * (x.dim() - 2)))
    return y * torch.sigmoid(y) if silu else y


NORM_BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", NORM_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels", [3, 24, 96, 100])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_rms_norm_silu_matches_oracle(backend, dtype, channels, silu, channels_last, poison_outputs):
    x = (torch.randn(2, channels, 3, 5, 4) * 3).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    gamma = (torch.rand(channels) + 0.5).to(dtype)
    out = ops.rms_norm_silu(x, gamma, silu=silu, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), norm_silu_oracle(x, gamma, silu), atol=TOL[dtype] * 10, rtol=TOL[dtype])


ALL_BACKENDS = ["reference", "torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("eps", [1e-12, 3e-2])
def test_rms_norm_silu_at_every_scale_and_eps(backend, scale, eps):
    """float64 oracle at input scales 1e-3, 1 and 1e3 with the default and a large eps (rows of 8
    channels at 1e-3 have norms ~3e-3, below 3e-2, so the clamp decides them). Catches eps added
    to the norm instead of bounding it, eps inside the square root, the sqrt(C) gain dropped."""
    x = torch.randn(2, 8, 2, 3, 3) * scale
    gamma = torch.rand(8) + 0.5
    for silu in (True, False):
        out = ops.rms_norm_silu(x, gamma, eps=eps, silu=silu, backend=backend)
        torch.testing.assert_close(out.double(), norm_silu_oracle(x, gamma, silu, eps), atol=1e-6 * scale, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rms_norm_silu_propagates_nan_and_inf_as_the_reference(backend):
    """A NaN anywhere in a pixel's channels makes that pixel NaN (F.normalize's clamp_min keeps a
    NaN norm); an inf makes its norm inf. Catches a max(norm, eps) that returns eps for a NaN norm
    (the Triton kernel gave 4.8e12 there), and NaN leaking into the other pixels."""
    x = torch.randn(1, 4, 1, 2, 3)
    x[0, 1, 0, 0, 0] = float("nan")
    x[0, 2, 0, 1, 2] = float("inf")
    gamma = torch.rand(4) + 0.5
    out = ops.rms_norm_silu(x, gamma, silu=False, backend=backend)
    want = (
        rms_norm_silu_reference(x, gamma, 1e-12, False) if backend != "reference" else norm_silu_oracle(x, gamma, False)
    )
    assert torch.equal(out.isnan(), want.isnan()), (out, want)
    assert out[0, :, 0, 0, 0].isnan().all() and not out[0, :, 0, 0, 1:].isnan().any()
    finite = want.isfinite()
    torch.testing.assert_close(out[finite].double(), want[finite].double(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", NORM_BACKENDS)
def test_rms_norm_silu_images_zero_rows_and_gradients(backend):
    x = torch.randn(3, 16, 5, 7)  # 4D: the VAE attention's per-frame norm
    x[1, :, 2, 3] = 0.0  # a zero pixel: the eps clamp keeps it finite
    gamma = torch.rand(16) + 0.5
    out = ops.rms_norm_silu(x, gamma.reshape(16, 1, 1), silu=False, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), norm_silu_oracle(x, gamma, False), atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 16, 5, 7)  # gradients away from the norm's kink at zero
    xs, gs = x.double().requires_grad_(), gamma.double().requires_grad_()
    xs32, gs32 = x.clone().requires_grad_(), gamma.clone().requires_grad_()
    grad = torch.randn_like(x)
    got = torch.autograd.grad(ops.rms_norm_silu(xs32, gs32, backend=backend), (xs32, gs32), grad)
    want = torch.autograd.grad(norm_silu_oracle(xs, gs), (xs, gs), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton)])
def test_rms_norm_silu_triton_opcheck(backend):
    x = torch.randn(2, 8, 3, 4, 5).to(memory_format=torch.channels_last_3d)
    for args in ((x, torch.rand(8), 1e-12, True), (x.contiguous(), torch.rand(8), 1e-6, False)):
        torch.library.opcheck(torch.ops.fastdit.rms_norm_silu_triton.default, args, test_utils=OPCHECK_UTILS)
        torch.library.opcheck(rms_norm_silu_reference, args)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.randn(4)), ValueError, "at least 2 dims"),
        (dict(weight=torch.randn(5)), ValueError, "weight must have C = 4"),
        (dict(weight=torch.randn(4).double()), TypeError, "x and weight must share one dtype"),
        (dict(eps=0.0), ValueError, "eps must be a positive number"),
        (dict(backend="cuda"), ValueError, "does not exist for this op"),
    ],
)
@pytest.mark.bad_input
def test_rms_norm_silu_bad_input(kwargs, error, match):
    x, weight = kwargs.pop("x", torch.randn(2, 4, 3)), kwargs.pop("weight", torch.randn(4))
    with pytest.raises(error, match=match):
        ops.rms_norm_silu(x, weight, **kwargs)

"""The reference's hand-written backward functions equal torch autograd through its own forward
functions, in float64: the fast backends' gradients are checked against these, so they must be
right on their own."""

import pytest
import torch

from fastdit.reference.modulation import (
    adaln_modulate_bwd_ref,
    adaln_modulate_ref,
    rms_norm_bwd_ref,
    rms_norm_ref,
)
from fastdit.reference.rms_norm_silu import rms_norm_silu_bwd_ref, rms_norm_silu_ref
from tests.conftest import packed_cu


def autograd_of(fn, grad, *inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_backward(affine):
    x = torch.randn(11, 24, dtype=torch.float64) * 2
    weight = torch.randn(24, dtype=torch.float64)
    grad = torch.randn_like(x)
    if affine:
        dx, dweight = rms_norm_bwd_ref(grad, x, weight, 1e-6)
        want_dx, want_dweight = autograd_of(lambda a, w: rms_norm_ref(a, w, 1e-6), grad, x, weight)
        torch.testing.assert_close(dweight, want_dweight)
    else:
        dx, dweight = rms_norm_bwd_ref(grad, x, None, 1e-6)
        (want_dx,) = autograd_of(lambda a: rms_norm_ref(a, None, 1e-6), grad, x)
        assert dweight is None
    torch.testing.assert_close(dx, want_dx)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_adaln_modulate_backward(norm):
    lengths = [5, 1, 7]
    cu = packed_cu(lengths)
    x = torch.randn(sum(lengths), 16, dtype=torch.float64)
    shift, scale = (torch.randn(3, 16, dtype=torch.float64) for _ in range(2))
    weight = torch.randn(16, dtype=torch.float64)
    bias = torch.randn(16, dtype=torch.float64) if norm == "layer" else None
    grad = torch.randn_like(x)
    got = adaln_modulate_bwd_ref(grad, x, shift, scale, cu, norm=norm, weight=weight, bias=bias)
    inputs = [x, shift, scale, weight] + ([bias] if bias is not None else [])

    def forward(a, s, c, w, b=None):
        return adaln_modulate_ref(a, s, c, cu, norm=norm, weight=w, bias=b)

    want = autograd_of(forward, grad, *inputs)
    for g, w in zip([t for t in got if t is not None], want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("silu", [True, False])
def test_rms_norm_silu_backward(silu):
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    gamma = torch.rand(8, dtype=torch.float64) + 0.5
    grad = torch.randn_like(x)
    dx, dgamma = rms_norm_silu_bwd_ref(grad, x, gamma, silu=silu)
    want_dx, want_dgamma = autograd_of(lambda a, g: rms_norm_silu_ref(a, g, silu=silu), grad, x, gamma)
    torch.testing.assert_close(dx, want_dx)
    torch.testing.assert_close(dgamma, want_dgamma)

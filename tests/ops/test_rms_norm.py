"""ops.rms_norm: every backend against a float64 oracle, forward and backward, and its errors."""

import pytest
import torch

from fastdit import ops
from tests.conftest import CPU_BACKENDS


def oracle(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xd = x.double()
    y = xd * torch.rsqrt(xd.square().mean(dim=-1, keepdim=True) + eps)
    return y if weight is None else y * weight.double()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(9, 24), (2, 5, 40), (1, 7)])
def test_matches_float64_forward_and_backward(backend, affine, shape):
    x = (torch.randn(shape) * 3).requires_grad_()
    weight = torch.randn(shape[-1]).requires_grad_() if affine else None
    y = ops.rms_norm(x, weight, eps=1e-5, backend=backend)
    want = oracle(x, weight, 1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    w = torch.randn(shape, dtype=torch.float64)
    leaves = [x] if weight is None else [x, weight]
    got = torch.autograd.grad((y.double() * w).sum(), leaves)
    expect = torch.autograd.grad((want * w).sum(), leaves)
    for g, e in zip(got, expect, strict=True):
        torch.testing.assert_close(g.double(), e.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_rows_are_read_through_their_view(backend):
    base = torch.randn(6, 64)
    view = base[:, ::2]  # last dim strided: the op takes a contiguous copy
    torch.testing.assert_close(ops.rms_norm(view, backend=backend), ops.rms_norm(view.contiguous(), backend=backend))


def test_fp16_rounds_once_like_the_reference():
    x, weight = torch.randn(5, 32).half(), torch.randn(32).half()
    want = oracle(x, weight, 1e-6).half()
    assert torch.equal(ops.rms_norm(x, weight, backend="reference"), want)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "x, weight, eps, match",
    [
        (torch.randn(4, 8), torch.randn(7), 1e-6, r"weight must have shape \(C,\) = \(8,\)"),
        (torch.randn(4, 8), torch.randn(8, 1), 1e-6, "weight must have 1 dims"),
        (torch.randn(4, 8), None, 0.0, "eps must be a positive number"),
        (torch.randn(4, 0), None, 1e-6, "last dim C >= 1"),
        (torch.randint(0, 3, (4, 8)), None, 1e-6, "x must have dtype"),
    ],
)
def test_bad_input_is_named(x, weight, eps, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.rms_norm(x, weight, eps=eps)

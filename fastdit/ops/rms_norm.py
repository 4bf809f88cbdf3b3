"""RMSNorm over the last dim: ``x * rsqrt(mean(x^2) + eps) * weight``, statistics in fp32.

The q / k norms of Wan's attention (across all heads of a token). Semantics in
:func:`fastdit.reference.modulation.rms_norm_ref`. The triton backend runs the adaLN modulation
kernel (kernels/modulation.py) with a zero modulation: one pass over the rows, forward and backward.
"""

import torch

from fastdit.kernels.launch import triton_missing
from fastdit.ops._common import as_shape, cast, compute_dtype, rms_rows
from fastdit.ops._registry import interpreter_fake, register_torch_backend, register_triton_backend
from fastdit.ops.dispatch import Backend, choose, register_backend
from fastdit.ops.validation import FLOAT_DTYPES, check_tensor
from fastdit.reference.common import dense_cu_seqlens
from fastdit.reference.modulation import rms_norm_bwd_ref, rms_norm_ref


def _setup(ctx, inputs, output):
    x, weight, ctx.eps = inputs
    ctx.save_for_backward(x, weight)


@torch.library.custom_op("fastdit::rms_norm_reference", mutates_args=())
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return rms_norm_ref(x, weight, eps)


def _reference_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dweight = rms_norm_bwd_ref(grad, x, weight, ctx.eps)
    return dx, dweight, None


rms_norm_reference.register_fake(lambda x, weight, eps: torch.empty_like(x))
rms_norm_reference.register_autograd(_reference_backward, setup_context=_setup)
register_backend(
    Backend(
        "rms_norm",
        "reference",
        rms_norm_reference,
        devices=None,
        dtypes=FLOAT_DTYPES,
        backward=lambda grad, x, weight, eps: rms_norm_bwd_ref(grad, x, weight, eps),
    )
)


def rms_norm_torch(x, weight, eps):
    """RMSNorm in float32 (float64 kept; :func:`fastdit.ops._common.rms_rows`), rounded once to x.dtype."""
    acc = compute_dtype(x.dtype)
    return cast(rms_rows(cast(x, acc), None if weight is None else cast(weight, acc), eps), x.dtype)


def _rms_norm_torch_backward(grad, x, weight, eps):
    """(dx, dweight) by autograd through :func:`rms_norm_torch` (the declared backward form)."""
    xs = x.detach().requires_grad_()
    ws = None if weight is None else weight.detach().requires_grad_()
    with torch.enable_grad():
        out = rms_norm_torch(xs, ws, eps)
        grads = torch.autograd.grad(out, [t for t in (xs, ws) if t is not None], grad)
    return grads[0], None if weight is None else grads[1]


register_torch_backend("rms_norm", rms_norm_torch, backward=_rms_norm_torch_backward)


if triton_missing() is None:
    from fastdit.kernels.modulation import modulation_backward, modulation_forward

    def _one_sample(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A zero modulation row and the cu_seqlens of one sample holding every row."""
        return x.new_zeros((1, x.shape[1]), dtype=torch.float32), dense_cu_seqlens(1, x.shape[0], x.device)

    @torch.library.triton_op("fastdit::rms_norm_triton", mutates_args=())
    def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        zeros, cu = _one_sample(x)
        return modulation_forward(x, None, None, zeros, zeros, weight, None, cu, "rms", eps)[1]

    @torch.library.triton_op("fastdit::rms_norm_backward_triton", mutates_args=())
    def rms_norm_backward_triton(
        grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dx, dweight): dweight the fp32 reduction over rows (empty without a weight)."""
        zeros, cu = _one_sample(x)
        g = modulation_backward(grad, None, x, None, None, zeros, weight, None, cu, "rms", eps, 1)
        return g["dx"], g["dweight"] if weight is not None else grad.new_empty(0, dtype=torch.float32)

    def _triton_backward_form(grad, x, weight, eps):
        dx, dweight = rms_norm_backward_triton(grad, x, weight, eps)
        return dx, None if weight is None else dweight.to(weight.dtype)

    def _triton_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return *_triton_backward_form(grad, x, weight, ctx.eps), None

    interpreter_fake(rms_norm_triton, lambda x, weight, eps: torch.empty_like(x))
    interpreter_fake(
        rms_norm_backward_triton,
        lambda grad, x, weight, eps: (
            torch.empty_like(x),
            grad.new_empty(0 if weight is None else weight.shape[0], dtype=torch.float32),
        ),
    )
    rms_norm_triton.register_autograd(_triton_backward, setup_context=_setup)
    register_triton_backend("rms_norm", rms_norm_triton, backward=_triton_backward_form)
else:
    register_triton_backend("rms_norm", None)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, *, eps: float = 1e-6, backend: str | None = None
) -> torch.Tensor:
    """RMSNorm of every row of ``x`` over its last dim, then ``* weight``.

    Args:
        x: ``(..., C)`` (any leading dims, e.g. ``(total, C)`` packed tokens); fp16 / bf16 / fp32 / fp64.
        weight: ``(C,)`` or None (no affine), any float dtype.
        eps: added to the mean square, > 0.
        backend: force a backend (``reference``, ``triton``); default the dispatcher's choice.

    Returns:
        ``x``'s shape and dtype; statistics and the product in fp32 (fp64 for fp64), rounded once.
    """
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a last dim C >= 1 to normalise over, got shape {tuple(x.shape)}")
    if weight is not None:
        check_tensor("weight", weight, ndims=(1,), device=x.device)
        if weight.shape[0] != x.shape[-1]:
            raise ValueError(f"weight must have shape (C,) = ({x.shape[-1]},), got {tuple(weight.shape)}")
    if not isinstance(eps, float | int) or isinstance(eps, bool) or eps <= 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    impl = choose("rms_norm", {"device": x.device, "dtype": x.dtype}, backend)
    return as_shape(impl.forward(rows, weight, float(eps)), x.shape)

"""RMS norm over channels, optionally fused with SiLU: the Wan VAE's ``silu(RMS_norm(x))``."""

import torch
import torch.nn.functional as F

from fastdit.kernels.launch import triton_missing
from fastdit.ops._common import cast, compute_dtype
from fastdit.ops._registry import interpreter_fake, register_torch_backend, register_triton_backend
from fastdit.ops.dispatch import Backend, choose, register_backend
from fastdit.ops.validation import FLOAT_DTYPES, check_same_dtype, check_tensor
from fastdit.reference.rms_norm_silu import rms_norm_silu_bwd_ref, rms_norm_silu_ref


def _setup(ctx, inputs, output):
    x, weight, ctx.eps, ctx.silu = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dweight = rms_norm_silu_bwd_ref(grad, x, weight, eps=ctx.eps, silu=ctx.silu)
    return dx, dweight, None, None


@torch.library.custom_op("fastdit::rms_norm_silu_reference", mutates_args=())
def rms_norm_silu_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, silu: bool) -> torch.Tensor:
    return rms_norm_silu_ref(x, weight, eps=eps, silu=silu).contiguous()  # fixed layout, as the fake says


rms_norm_silu_reference.register_fake(lambda x, weight, eps, silu: x.new_empty(x.shape))
rms_norm_silu_reference.register_autograd(_backward, setup_context=_setup)
register_backend(Backend("rms_norm_silu", "reference", rms_norm_silu_reference, devices=None, dtypes=FLOAT_DTYPES))


def rms_norm_silu_torch(x, weight, eps, silu):
    """Wan's ``F.normalize(x, dim=1) * sqrt(C) * gamma`` (then SiLU) in float32, in x's memory
    format; ``sqrt(C) * gamma`` is folded into one (C,) vector first."""
    acc = compute_dtype(x.dtype)
    gain = (cast(weight, acc) * x.shape[1] ** 0.5).reshape((1, -1) + (1,) * (x.dim() - 2))
    y = F.normalize(cast(x, acc), dim=1, eps=eps) * gain
    return cast(F.silu(y) if silu else y, x.dtype)


register_torch_backend("rms_norm_silu", rms_norm_silu_torch)


if triton_missing() is None:
    from fastdit.kernels.rms_norm_silu import rms_norm_silu_forward

    @torch.library.triton_op("fastdit::rms_norm_silu_triton", mutates_args=())
    def rms_norm_silu_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, silu: bool) -> torch.Tensor:
        return rms_norm_silu_forward(x, weight, eps, silu)

    interpreter_fake(
        rms_norm_silu_triton,
        # the launcher's layout: channels last (x's own layout when it already is)
        lambda x, weight, eps, silu: torch.empty_like(x.movedim(1, -1), memory_format=torch.contiguous_format).movedim(
            -1, 1
        ),
    )
    rms_norm_silu_triton.register_autograd(_backward, setup_context=_setup)
    register_triton_backend("rms_norm_silu", rms_norm_silu_triton)
else:
    register_triton_backend("rms_norm_silu", None)


def rms_norm_silu(
    x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-12, silu: bool = True, backend: str | None = None
) -> torch.Tensor:
    """``silu(x / max(||x||_C, eps) * sqrt(C) * weight)``, the L2 norm taken over channels (dim 1).

    Args:
        x: ``(B, C, ...)`` (for the VAE ``(B, C, T, H, W)``), any memory format; channels-last
            is the fast one (the ``triton`` kernel reads rows of contiguous channels and copies
            any other layout first). fp16 / bf16 / fp32 / fp64.
        weight: ``(C,)`` (gamma), x's dtype; any shape with C elements is flattened.
        eps: lower bound of the norm (``F.normalize``'s, 1e-12 by default, as in Wan).
        silu: apply SiLU after the norm (Wan's residual blocks and output heads); False gives the plain RMS norm.
        backend: force a backend; default the dispatcher's choice.

    Returns:
        ``(B, C, ...)`` in x's dtype; channels-last from ``triton``. Statistics and math in fp32.
    """
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be (B, C, ...) with at least 2 dims, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, device=x.device)
    check_same_dtype(("x", "weight"), (x, weight))
    if weight.numel() != x.shape[1]:
        raise ValueError(f"weight must have C = {x.shape[1]} elements, got shape {tuple(weight.shape)}")
    if not isinstance(eps, float | int) or eps <= 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    impl = choose("rms_norm_silu", {"device": x.device, "dtype": x.dtype}, backend)
    return impl.forward(x, weight.reshape(-1), float(eps), bool(silu))

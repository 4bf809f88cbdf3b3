"""adaLN modulation: ``norm(x) * (1 + scale) + shift`` with LayerNorm or RMSNorm statistics in fp32."""

import torch
import torch.nn.functional as F

from fastdit._extension import cuda_extension_missing
from fastdit.kernels.launch import triton_missing
from fastdit.ops._common import (
    add_mul,
    as_packed,
    as_shape,
    cast,
    compute_dtype,
    last_dim_contiguous,
    modulation_rows,
    rms_rows,
    rows_for_tokens,
)
from fastdit.ops._registry import interpreter_fake, register_torch_backend, register_triton_backend
from fastdit.ops.dispatch import Backend, choose, register_backend
from fastdit.ops.validation import FLOAT_DTYPES, check_norm_args, check_tensor
from fastdit.reference.modulation import adaln_modulate_bwd_ref, adaln_modulate_ref


@torch.library.custom_op("fastdit::adaln_modulate_reference", mutates_args=())
def adaln_modulate_reference(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    norm: str,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return adaln_modulate_ref(x, shift, scale, cu_seqlens, norm=norm, eps=eps, weight=weight, bias=bias)


@adaln_modulate_reference.register_fake
def _(x, shift, scale, cu_seqlens, norm, eps, weight, bias):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, shift, scale, cu_seqlens, ctx.norm, ctx.eps, weight, bias = inputs
    ctx.save_for_backward(x, shift, scale, cu_seqlens, weight, bias)


def _backward(ctx, grad):
    x, shift, scale, cu_seqlens, weight, bias = ctx.saved_tensors
    dx, dshift, dscale, dweight, dbias = adaln_modulate_bwd_ref(
        grad, x, shift, scale, cu_seqlens, norm=ctx.norm, eps=ctx.eps, weight=weight, bias=bias
    )
    return dx, dshift, dscale, None, None, None, dweight, dbias


adaln_modulate_reference.register_autograd(_backward, setup_context=_setup)
register_backend(Backend("adaln_modulate", "reference", adaln_modulate_reference, devices=None, dtypes=FLOAT_DTYPES))


# ---- torch backend: F.layer_norm / F.rms_norm and one multiply-add --------------------------------------


def adaln_modulate_torch(x, shift, scale, cu_seqlens, norm, eps, weight, bias):
    """The reference's math on PyTorch's fused norms: two passes over x instead of eight."""
    acc = compute_dtype(x.dtype)
    channels = (x.shape[-1],)
    w = None if weight is None else cast(weight, acc)
    if norm == "layer":
        normed = F.layer_norm(cast(x, acc), channels, w, None if bias is None else cast(bias, acc), eps)
    else:
        normed = rms_rows(cast(x, acc), w, eps)
    shift_t = rows_for_tokens(cast(shift, acc), cu_seqlens, x.shape[0])
    scale_t = rows_for_tokens(cast(scale, acc), cu_seqlens, x.shape[0])
    return cast(add_mul(shift_t, normed, 1.0 + scale_t), x.dtype)


register_torch_backend("adaln_modulate", adaln_modulate_torch)


# ---- triton backend: kernels/modulation.py ------------------------------------------------------

if triton_missing() is None:
    from fastdit.kernels.modulation import modulation_backward, modulation_forward

    @torch.library.triton_op("fastdit::adaln_modulate_triton", mutates_args=())
    def adaln_modulate_triton(
        x: torch.Tensor,
        shift: torch.Tensor,
        scale: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        norm: str,
        eps: float,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        return modulation_forward(x, None, None, shift, scale, weight, bias, cu_seqlens, norm, eps)[1]

    @torch.library.triton_op("fastdit::adaln_modulate_backward_triton", mutates_args=())
    def adaln_modulate_backward_triton(
        grad: torch.Tensor,
        x: torch.Tensor,
        scale: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        norm: str,
        eps: float,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dx, dshift, dscale, dweight, dbias); the last four in fp32, dweight/dbias empty if absent."""
        g = modulation_backward(grad, None, x, None, None, scale, weight, bias, cu_seqlens, norm, eps, scale.shape[0])
        dweight = g["dweight"] if weight is not None else grad.new_empty(0, dtype=torch.float32)
        dbias = g["dbias"] if bias is not None else grad.new_empty(0, dtype=torch.float32)
        return g["dx"], g["dshift"], g["dscale"], dweight, dbias

    def _triton_backward(ctx, grad):
        x, shift, scale, cu_seqlens, weight, bias = ctx.saved_tensors
        dx, dshift, dscale, dweight, dbias = adaln_modulate_backward_triton(
            grad, x, scale, cu_seqlens, ctx.norm, ctx.eps, weight, bias
        )
        return (
            dx,
            dshift.to(shift.dtype),
            dscale.to(scale.dtype),
            None,
            None,
            None,
            None if weight is None else dweight.to(weight.dtype),
            None if bias is None else dbias.to(bias.dtype),
        )

    interpreter_fake(adaln_modulate_triton, lambda x, *args: torch.empty_like(x))
    interpreter_fake(
        adaln_modulate_backward_triton,
        lambda grad, x, scale, cu, norm, eps, weight, bias: (
            torch.empty_like(x),
            scale.new_empty(scale.shape, dtype=torch.float32),
            scale.new_empty(scale.shape, dtype=torch.float32),
            grad.new_empty(0 if weight is None else weight.shape[0], dtype=torch.float32),
            grad.new_empty(0 if bias is None else bias.shape[0], dtype=torch.float32),
        ),
    )
    adaln_modulate_triton.register_autograd(_triton_backward, setup_context=_setup)
    # The backward form: (grad, x, scale, cu_seqlens, norm, eps, weight, bias) -> fp32 gradients;
    # the fused q/k RMSNorm's backward runs it through the dispatcher's table (dispatch.form).
    register_triton_backend("adaln_modulate", adaln_modulate_triton, backward=adaln_modulate_backward_triton)
else:
    register_triton_backend("adaln_modulate", None)


# ---- cuda backend: csrc/adaln_modulate.cu -------------------------------------------------------

_CUDA_THREADS, _CUDA_MAX_ITEMS = 256, 8  # csrc/adaln_modulate.cu: one CTA of 256 threads per row


def _cuda_check(inputs: dict) -> list[str]:
    """The row must fit the kernel's registers: C <= 256 threads x 8 vectors x VEC elements."""
    vec = 16 // inputs["dtype"].itemsize
    per_thread = vec if inputs["channels"] % vec == 0 else 1
    limit = _CUDA_THREADS * _CUDA_MAX_ITEMS * per_thread
    return [] if inputs["channels"] <= limit else [f"C={inputs['channels']} > {limit} (the cuda kernel's row limit)"]


def _adaln_modulate_cuda(x, shift, scale, cu_seqlens, norm, eps, weight, bias):
    # The kernel reads fp32 modulation and affine rows and (N, C) rows with a contiguous last dim.
    def fp32(t):
        return None if t is None else t.float().contiguous()

    x = last_dim_contiguous(x)
    return torch.ops.fastdit.adaln_modulate_cuda(
        x,
        fp32(shift),
        fp32(scale),
        None if cu_seqlens is None else cu_seqlens.contiguous(),
        norm,
        eps,
        fp32(weight),
        fp32(bias),
    )


def _register_cuda_op() -> None:
    torch.library.register_fake("fastdit::adaln_modulate_cuda", lambda x, *args: torch.empty_like(x))
    # The backward has no cuda kernel: the Triton backward kernel where Triton exists, else the reference.
    backward = _triton_backward if triton_missing() is None else _backward
    torch.library.register_autograd("fastdit::adaln_modulate_cuda", backward, setup_context=_setup)


if cuda_extension_missing() is None:
    _register_cuda_op()
register_backend(
    Backend(
        "adaln_modulate",
        "cuda",
        _adaln_modulate_cuda,
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        check=_cuda_check,
        unavailable=cuda_extension_missing(),
    )
)


def adaln_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    norm: str = "layer",
    eps: float = 1e-6,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Normalize each token over channels, then modulate: ``norm(x) * (1 + scale) + shift``.

    Args:
        x: ``(total, C)`` packed with ``cu_seqlens``, or dense ``(B, S, C)``; fp16/bf16/fp32/fp64.
        shift, scale: per sample ``(B, C)`` (dense ``x`` also takes ``(B, 1, C)``), or per token
            with ``x``'s shape; any float dtype (fp32 in Wan), both in the same form.
        cu_seqlens: ``(B+1,)`` int32 for packed ``x``; None for dense ``x``.
        norm: ``"layer"`` (LayerNorm: centre and scale) or ``"rms"`` (RMSNorm: scale only).
        eps: added to the variance (mean square for RMS) before the reciprocal square root.
        weight, bias: optional ``(C,)`` affine of the norm, applied before the modulation
            (RMSNorm takes no bias).
        backend: force a backend; default the dispatcher's choice.

    Returns:
        ``(total, C)`` or ``(B, S, C)`` in ``x.dtype``; statistics and modulation in float32.
    """
    check_norm_args(norm, eps)
    packed, cu = as_packed("x", x, cu_seqlens, packed_ndim=2)
    shift_rows, shift_per_token = modulation_rows("shift", shift, x, packed, cu)
    scale_rows, scale_per_token = modulation_rows("scale", scale, x, packed, cu)
    if shift_per_token != scale_per_token:
        raise ValueError("shift and scale must both be per sample (B, C) or both per token")
    channels = packed.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, ndims=(1,), device=x.device)
            if t.shape[0] != channels:
                raise ValueError(f"{name} must have shape (C,) = ({channels},), got {tuple(t.shape)}")
    if norm == "rms" and bias is not None:
        raise ValueError("bias is not defined for norm='rms' (RMSNorm has a weight only)")
    impl = choose(
        "adaln_modulate",
        {"device": x.device, "dtype": x.dtype, "channels": channels, "norm": norm, "per_token": shift_per_token},
        backend,
    )
    out = impl.forward(packed, shift_rows, scale_rows, None if shift_per_token else cu, norm, float(eps), weight, bias)
    return as_shape(out, x.shape)

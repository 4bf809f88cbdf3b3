"""Gated residuals: ``gated_residual`` (``res + y * gate``) and the fused ``gated_residual_modulate``."""

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
    modulation_rows,
    rms_rows,
    rows_for_tokens,
)
from fastdit.ops._registry import interpreter_fake, register_torch_backend, register_triton_backend
from fastdit.ops.dispatch import Backend, choose, register_backend
from fastdit.ops.validation import FLOAT_DTYPES, check_norm_args, check_same_dtype, check_tensor
from fastdit.reference.common import upcast
from fastdit.reference.modulation import (
    adaln_modulate_bwd_ref,
    gated_residual_bwd_ref,
    gated_residual_modulate_ref,
    gated_residual_ref,
)

# ---- reference backend ---------------------------------------------------------------------------


@torch.library.custom_op("fastdit::gated_residual_reference", mutates_args=())
def gated_residual_reference(
    res: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, cu_seqlens: torch.Tensor | None
) -> torch.Tensor:
    return gated_residual_ref(res, y, gate, cu_seqlens)


def _fake_gated_residual(res, y, gate, cu_seqlens):
    return torch.empty_like(res)


def _setup_gated_residual(ctx, inputs, output):
    res, y, gate, cu_seqlens = inputs
    ctx.res_dtype = res.dtype
    ctx.save_for_backward(y, gate, cu_seqlens)


def _backward_gated_residual(ctx, grad):
    y, gate, cu_seqlens = ctx.saved_tensors
    dres, dy, dgate = gated_residual_bwd_ref(grad, y, gate, cu_seqlens, ctx.res_dtype)
    return dres, dy, dgate, None


gated_residual_reference.register_fake(_fake_gated_residual)
gated_residual_reference.register_autograd(_backward_gated_residual, setup_context=_setup_gated_residual)
register_backend(Backend("gated_residual", "reference", gated_residual_reference, devices=None, dtypes=FLOAT_DTYPES))


# ---- cuda backend: fastdit::gated_residual_cuda from csrc/gated_residual.cu -----------------------


def _register_cuda_op() -> None:
    """Fake and autograd for the C++ op (same math as the reference, so the same backward)."""
    name = "fastdit::gated_residual_cuda"
    torch.library.register_fake(name, _fake_gated_residual)
    torch.library.register_autograd(name, _backward_gated_residual, setup_context=_setup_gated_residual)


def _gated_residual_cuda(res, y, gate, cu_seqlens):
    # The kernel reads fp32 gate rows (Wan's modulation dtype) and contiguous (N, C) rows.
    cu = None if cu_seqlens is None else cu_seqlens.contiguous()
    return torch.ops.fastdit.gated_residual_cuda(res.contiguous(), y.contiguous(), gate.float().contiguous(), cu)


def _cuda_check(inputs: dict) -> list[str]:
    return [] if inputs["y_dtype"] == inputs["dtype"] else [f"y dtype {inputs['y_dtype']} differs from res dtype"]


if cuda_extension_missing() is None:
    _register_cuda_op()
register_backend(
    Backend(
        "gated_residual",
        "cuda",
        _gated_residual_cuda,
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        check=_cuda_check,
        unavailable=cuda_extension_missing(),
    )
)


@torch.library.custom_op("fastdit::gated_residual_modulate_reference", mutates_args=())
def gated_residual_modulate_reference(
    res: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    norm: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_modulate_ref(res, y, gate, shift, scale, cu_seqlens, norm=norm, eps=eps)


@gated_residual_modulate_reference.register_fake
def _(res, y, gate, shift, scale, cu_seqlens, norm, eps):
    return torch.empty_like(res), torch.empty_like(res)


def _setup_grm(ctx, inputs, output):
    res, y, gate, shift, scale, cu_seqlens, ctx.norm, ctx.eps = inputs
    ctx.res_dtype = res.dtype
    ctx.save_for_backward(y, gate, shift, scale, cu_seqlens, output[0])


def _backward_grm(ctx, grad_r, grad_mod):
    y, gate, shift, scale, cu_seqlens, r = ctx.saved_tensors
    dr_mod, dshift, dscale, _, _ = adaln_modulate_bwd_ref(
        grad_mod, r, shift, scale, cu_seqlens, norm=ctx.norm, eps=ctx.eps
    )
    dr = upcast(grad_r) + upcast(dr_mod)
    dres, dy, dgate = gated_residual_bwd_ref(dr, y, gate, cu_seqlens, ctx.res_dtype)
    return dres, dy, dgate, dshift, dscale, None, None, None


gated_residual_modulate_reference.register_autograd(_backward_grm, setup_context=_setup_grm)
register_backend(
    Backend(
        "gated_residual_modulate", "reference", gated_residual_modulate_reference, devices=None, dtypes=FLOAT_DTYPES
    )
)


# ---- torch backend: one multiply-add, then F.layer_norm / F.rms_norm ------------------------------------


def gated_residual_torch(res, y, gate, cu_seqlens):
    """``res + y * gate`` as one multiply-add in float32 (float64 kept), cast to res.dtype."""
    acc = compute_dtype(res.dtype)
    gate_t = rows_for_tokens(cast(gate, acc), cu_seqlens, res.shape[0])
    return cast(add_mul(cast(res, acc), cast(y, acc), gate_t), res.dtype)


def gated_residual_modulate_torch(res, y, gate, shift, scale, cu_seqlens, norm, eps):
    """The residual, rounded to res.dtype, then its modulation (the unfused pair's semantics)."""
    r = gated_residual_torch(res, y, gate, cu_seqlens)
    acc = compute_dtype(res.dtype)
    channels = (r.shape[-1],)
    normed = F.layer_norm(cast(r, acc), channels, eps=eps) if norm == "layer" else rms_rows(cast(r, acc), None, eps)
    shift_t = rows_for_tokens(cast(shift, acc), cu_seqlens, r.shape[0])
    scale_t = rows_for_tokens(cast(scale, acc), cu_seqlens, r.shape[0])
    return r, cast(add_mul(shift_t, normed, 1.0 + scale_t), res.dtype)


register_torch_backend("gated_residual", gated_residual_torch)
register_torch_backend("gated_residual_modulate", gated_residual_modulate_torch)


# ---- triton backend: kernels/modulation.py --------------------------------------------------------

if triton_missing() is None:
    from fastdit.kernels.modulation import modulation_backward, modulation_forward

    @torch.library.triton_op("fastdit::gated_residual_triton", mutates_args=())
    def gated_residual_triton(
        res: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, cu_seqlens: torch.Tensor | None
    ) -> torch.Tensor:
        return modulation_forward(res, y, gate, None, None, None, None, cu_seqlens, "layer", 1.0)[0]

    @torch.library.triton_op("fastdit::gated_residual_backward_triton", mutates_args=())
    def gated_residual_backward_triton(
        grad: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, cu_seqlens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dy, dgate in fp32)."""
        g = modulation_backward(None, grad, None, y, gate, None, None, None, cu_seqlens, "layer", 1.0, gate.shape[0])
        return g["dy"], g["dgate"]

    def _backward_gated_residual_triton(ctx, grad):
        y, gate, cu_seqlens = ctx.saved_tensors
        dy, dgate = gated_residual_backward_triton(grad, y, gate, cu_seqlens)
        return grad.to(ctx.res_dtype), dy, dgate.to(gate.dtype), None

    @torch.library.triton_op("fastdit::gated_residual_modulate_triton", mutates_args=())
    def gated_residual_modulate_triton(
        res: torch.Tensor,
        y: torch.Tensor,
        gate: torch.Tensor,
        shift: torch.Tensor,
        scale: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        norm: str,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return modulation_forward(res, y, gate, shift, scale, None, None, cu_seqlens, norm, eps)

    @torch.library.triton_op("fastdit::gated_residual_modulate_backward_triton", mutates_args=())
    def gated_residual_modulate_backward_triton(
        grad_r: torch.Tensor,
        grad_mod: torch.Tensor,
        r: torch.Tensor,
        y: torch.Tensor,
        gate: torch.Tensor,
        scale: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        norm: str,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dres, dy, dgate, dshift, dscale); the last three in fp32."""
        g = modulation_backward(grad_mod, grad_r, r, y, gate, scale, None, None, cu_seqlens, norm, eps, gate.shape[0])
        return g["dx"], g["dy"], g["dgate"], g["dshift"], g["dscale"]

    def _backward_grm_triton(ctx, grad_r, grad_mod):
        y, gate, shift, scale, cu_seqlens, r = ctx.saved_tensors
        dres, dy, dgate, dshift, dscale = gated_residual_modulate_backward_triton(
            grad_r, grad_mod, r, y, gate, scale, cu_seqlens, ctx.norm, ctx.eps
        )
        return dres, dy, dgate.to(gate.dtype), dshift.to(shift.dtype), dscale.to(scale.dtype), None, None, None

    def _fp32_like(t):
        return t.new_empty(t.shape, dtype=torch.float32)

    interpreter_fake(gated_residual_triton, _fake_gated_residual)
    interpreter_fake(gated_residual_backward_triton, lambda grad, y, gate, cu: (torch.empty_like(y), _fp32_like(gate)))
    interpreter_fake(gated_residual_modulate_triton, lambda res, *args: (torch.empty_like(res), torch.empty_like(res)))
    interpreter_fake(
        gated_residual_modulate_backward_triton,
        lambda grad_r, grad_mod, r, y, gate, scale, *args: (
            torch.empty_like(r),
            torch.empty_like(y),
            _fp32_like(gate),
            _fp32_like(scale),
            _fp32_like(scale),
        ),
    )
    gated_residual_triton.register_autograd(_backward_gated_residual_triton, setup_context=_setup_gated_residual)
    gated_residual_modulate_triton.register_autograd(_backward_grm_triton, setup_context=_setup_grm)
    register_triton_backend("gated_residual", gated_residual_triton)
    register_triton_backend("gated_residual_modulate", gated_residual_modulate_triton)
else:
    register_triton_backend("gated_residual", None)
    register_triton_backend("gated_residual_modulate", None)


# ---- public API ------------------------------------------------------------------------------------


def _prepare(res, y, gate, cu_seqlens):
    packed, cu = as_packed("res", res, cu_seqlens, packed_ndim=2)
    check_tensor("y", y, device=res.device)
    if y.shape != res.shape:
        raise ValueError(f"y must have the shape of res {tuple(res.shape)}, got {tuple(y.shape)}")
    gate_rows, per_token = modulation_rows("gate", gate, res, packed, cu)
    return packed, as_shape(y, packed.shape), cu, gate_rows, per_token


def gated_residual(
    res: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``res + y * gate``, math in float32, result in ``res.dtype``.

    Args:
        res: ``(total, C)`` packed with ``cu_seqlens``, or dense ``(B, S, C)``; fp16/bf16/fp32/fp64.
        y: like ``res`` (its dtype may differ; the cuda backend wants it equal).
        gate: per sample ``(B, C)`` (dense also ``(B, 1, C)``) or per token like ``res``; float32 in Wan.
        cu_seqlens: ``(B+1,)`` int32 for packed input; None for dense.
        backend: force a backend; default the dispatcher's choice.

    Returns:
        Tensor of ``res``'s shape and dtype.
    """
    packed, y_packed, cu, gate_rows, per_token = _prepare(res, y, gate, cu_seqlens)
    impl = choose(
        "gated_residual",
        {"device": res.device, "dtype": res.dtype, "y_dtype": y.dtype, "per_token": per_token},
        backend,
    )
    return as_shape(impl.forward(packed, y_packed, gate_rows, None if per_token else cu), res.shape)


def gated_residual_modulate(
    res: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    norm: str = "layer",
    eps: float = 1e-6,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = res + y * gate`` and ``adaln_modulate(r, shift, scale)`` in one call.

    The norm reads ``r`` rounded to ``res.dtype``, exactly as the unfused pair computes it.

    Args:
        res, y, gate, cu_seqlens: as :func:`gated_residual`.
        shift, scale: as :func:`adaln_modulate`; gate, shift and scale all per sample or all per token.
        norm, eps: as :func:`adaln_modulate` (no affine).
        backend: force a backend; default the dispatcher's choice.

    Returns:
        ``(r, modulated)``, both of ``res``'s shape and dtype.
    """
    check_norm_args(norm, eps)
    packed, y_packed, cu, gate_rows, per_token = _prepare(res, y, gate, cu_seqlens)
    shift_rows, shift_per_token = modulation_rows("shift", shift, res, packed, cu)
    scale_rows, scale_per_token = modulation_rows("scale", scale, res, packed, cu)
    if not per_token == shift_per_token == scale_per_token:
        raise ValueError("gate, shift and scale must all be per sample (B, C) or all per token")
    check_same_dtype(("shift", "scale"), (shift, scale))
    impl = choose(
        "gated_residual_modulate",
        {"device": res.device, "dtype": res.dtype, "y_dtype": y.dtype, "norm": norm, "per_token": per_token},
        backend,
    )
    r, mod = impl.forward(
        packed, y_packed, gate_rows, shift_rows, scale_rows, None if per_token else cu, norm, float(eps)
    )
    return as_shape(r, res.shape), as_shape(mod, res.shape)

"""adaLN modulation and gated residuals (Wan 2.1 semantics), forward and backward.

Statistics and modulation run in float32 (float64 for float64 inputs) whatever the input dtype;
outputs are cast back to the dtype of ``x`` (resp. ``res``), as diffusers'
``FP32LayerNorm(x.float()) * (1 + scale) + shift`` followed by ``.type_as(x)`` does.

Modulation tensors (shift, scale, gate) are either per sample, ``(B, C)`` together with
``cu_seqlens (B+1,)``, or per token, ``(total, C)`` with ``cu_seqlens=None``.
"""

import torch

from fastdit.reference.common import per_sample_sum, per_token, upcast


def _normalize(xf: torch.Tensor, norm: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat, rstd) of float32 rows; LayerNorm centres, RMSNorm does not."""
    if norm == "layer":
        mean = xf.mean(dim=-1, keepdim=True)
        centred = xf - mean
        rstd = torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + eps)
        return centred * rstd, rstd
    if norm == "rms":
        rstd = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
        return xf * rstd, rstd
    raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")


def adaln_modulate_ref(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    *,
    norm: str = "layer",
    eps: float = 1e-6,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` on packed ``x: (total, C)``; norm's affine is optional."""
    total = x.shape[0]
    xf = upcast(x)
    normed, _ = _normalize(xf, norm, eps)
    if weight is not None:
        normed = normed * weight.to(xf.dtype)
    if bias is not None:
        normed = normed + bias.to(xf.dtype)
    shift_t = per_token(shift.to(xf.dtype), cu_seqlens, total)
    scale_t = per_token(scale.to(xf.dtype), cu_seqlens, total)
    return (normed * (1.0 + scale_t) + shift_t).to(x.dtype)


def adaln_modulate_bwd_ref(
    grad: torch.Tensor,
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    *,
    norm: str = "layer",
    eps: float = 1e-6,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dshift, dscale, dweight, dbias) of adaln_modulate_ref, float32 math."""
    total = x.shape[0]
    xf = upcast(x)
    g = grad.to(xf.dtype)
    x_hat, rstd = _normalize(xf, norm, eps)
    normed = x_hat * weight.to(xf.dtype) if weight is not None else x_hat
    if bias is not None:
        normed = normed + bias.to(xf.dtype)
    scale_t = per_token(scale.to(xf.dtype), cu_seqlens, total)
    rows = shift.shape[0]
    d_shift = per_sample_sum(g, cu_seqlens, rows)
    d_scale = per_sample_sum(g * normed, cu_seqlens, rows)
    d_normed = g * (1.0 + scale_t)
    d_weight = (d_normed * x_hat).sum(0) if weight is not None else None
    d_bias = d_normed.sum(0) if bias is not None else None
    d_xhat = d_normed * weight.to(xf.dtype) if weight is not None else d_normed
    proj = (d_xhat * x_hat).mean(dim=-1, keepdim=True)
    if norm == "layer":
        dx = rstd * (d_xhat - d_xhat.mean(dim=-1, keepdim=True) - x_hat * proj)
    else:
        dx = rstd * (d_xhat - x_hat * proj)
    return (
        dx.to(x.dtype),
        d_shift.to(shift.dtype),
        d_scale.to(scale.dtype),
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )


def gated_residual_ref(
    res: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, cu_seqlens: torch.Tensor | None
) -> torch.Tensor:
    """``res + y * gate`` in float32, cast to res.dtype; packed ``res, y: (total, C)``."""
    acc = upcast(res).dtype
    gate_t = per_token(gate.to(acc), cu_seqlens, res.shape[0])
    return (res.to(acc) + y.to(acc) * gate_t).to(res.dtype)


def gated_residual_bwd_ref(
    grad: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, cu_seqlens: torch.Tensor | None, res_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dres, dy, dgate) of gated_residual_ref."""
    acc = torch.promote_types(res_dtype, torch.float32)
    g = grad.to(acc)
    gate_t = per_token(gate.to(acc), cu_seqlens, y.shape[0])
    d_gate = per_sample_sum(g * y.to(acc), cu_seqlens, gate.shape[0])
    return g.to(res_dtype), (g * gate_t).to(y.dtype), d_gate.to(gate.dtype)


def gated_residual_modulate_ref(
    res: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    *,
    norm: str = "layer",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = res + y * gate`` and ``adaln_modulate(r)``; the norm reads r rounded to res.dtype,

    exactly what the unfused sequence (residual in the model dtype, then the norm) computes.
    """
    r = gated_residual_ref(res, y, gate, cu_seqlens)
    return r, adaln_modulate_ref(r, shift, scale, cu_seqlens, norm=norm, eps=eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of each row of ``x (rows, C)`` with weight ``(C,)`` or None; fp32 math, result in x.dtype."""
    xf = upcast(x)
    rstd = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    normed = xf * rstd
    return (normed if weight is None else normed * weight.to(xf.dtype)).to(x.dtype)


def rms_norm_bwd_ref(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dweight) of :func:`rms_norm_ref`, fp32 math; dweight in weight's dtype (None without)."""
    xf = upcast(x)
    g = grad.to(xf.dtype)
    rstd = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    x_hat = xf * rstd
    d_weight = None if weight is None else (g * x_hat).sum(0).to(weight.dtype)
    d_xhat = g if weight is None else g * weight.to(xf.dtype)
    dx = rstd * (d_xhat - x_hat * (d_xhat * x_hat).mean(dim=-1, keepdim=True))
    return dx.to(x.dtype), d_weight

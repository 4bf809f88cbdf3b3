"""Shapes shared by the public ops: the packed-or-dense convention and per-sample / per-token
modulation rows. The backends' registration helpers are in :mod:`fastdit.ops._registry`."""

import torch

from fastdit.ops.validation import check_cu_seqlens, check_tensor
from fastdit.reference.common import dense_cu_seqlens, sample_index

_dense_cu: dict = {}


def _dense_boundaries(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """:func:`dense_cu_seqlens`, kept per (B, S) for CPU tensors in eager mode: every op of a
    dense model call rebuilds the same boundaries, and at small sizes building them costs more
    than the op (made outside inference mode, so any later call may save them for backward)."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return dense_cu_seqlens(batch, seqlen, device)
    cu = _dense_cu.get((batch, seqlen))
    if cu is None:
        if len(_dense_cu) >= 256:
            _dense_cu.clear()
        with torch.inference_mode(False):
            cu = _dense_cu[(batch, seqlen)] = dense_cu_seqlens(batch, seqlen, device)
    return cu


def as_packed(
    name: str, x: torch.Tensor, cu_seqlens: torch.Tensor | None, packed_ndim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """View ``x`` as packed ``(total, ...)`` with its cu_seqlens.

    Packed input has ``packed_ndim`` dims and comes with ``cu_seqlens``; dense input has one more
    leading batch dim ``(B, S, ...)`` and no cu_seqlens.
    """
    check_tensor(name, x, ndims=(packed_ndim, packed_ndim + 1))
    if x.dim() == packed_ndim + 1:
        if cu_seqlens is not None:
            raise ValueError(
                f"{name} is dense {tuple(x.shape)} (B, S, ...), so cu_seqlens must be None; "
                "pass packed (total, ...) input with cu_seqlens instead"
            )
        batch, seqlen = x.shape[:2]
        return x.reshape(batch * seqlen, *x.shape[2:]), _dense_boundaries(batch, seqlen, x.device)
    if cu_seqlens is None:
        raise ValueError(f"{name} is packed {tuple(x.shape)} (total, ...), so cu_seqlens (B+1,) int32 is required")
    check_cu_seqlens("cu_seqlens", cu_seqlens, x.shape[0], x.device)
    return x, cu_seqlens


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (what every kernel indexes), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def modulation_rows(
    name: str, mod: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, cu: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """Normalize a modulation tensor to ``(rows, C)`` and say whether it is per token.

    Accepted: per sample ``(B, C)`` (dense input also ``(B, 1, C)``), or per token with the
    shape of ``x`` (``(total, C)`` packed, ``(B, S, C)`` dense).
    """
    check_tensor(name, mod, ndims=(2, 3), device=x.device)
    channels = x.shape[-1]
    batch = cu.shape[0] - 1
    if mod.shape[-1] != channels:
        raise ValueError(f"{name} must have C = {channels} channels in its last dim, got shape {tuple(mod.shape)}")
    if x.dim() == 3 and mod.dim() == 3:  # dense input
        if mod.shape[:2] == (batch, 1):
            return mod.reshape(batch, channels), False
        if mod.shape == x.shape:
            return mod.reshape(packed.shape[0], channels), True
    elif mod.dim() == 2:
        if mod.shape[0] == batch:
            return mod, False
        if mod.shape[0] == packed.shape[0]:
            return mod, True
    raise ValueError(
        f"{name} must be per sample (B, C) = ({batch}, {channels}) or per token like x {tuple(x.shape)}, "
        f"got {tuple(mod.shape)}"
    )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the ``torch`` backends compute in: float32 for fp16 / bf16 / fp32, float64 kept (the
    ops' contract: statistics and modulation in float32 whatever the input dtype)."""
    return torch.promote_types(dtype, torch.float32)


def as_shape(t: torch.Tensor, shape) -> torch.Tensor:
    """``t.reshape(shape)``, or ``t`` itself when it has that shape already (the packed form of
    packed input): a no-op reshape still costs a view's dispatch per call."""
    return t if t.shape == shape else t.reshape(shape)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: itself when it already is (skipping ``.to``'s dispatch, which at the
    small sizes of a CPU run costs as much as the math)."""
    return t if t.dtype == dtype else t.to(dtype)


def rows_for_tokens(mod: torch.Tensor, cu_seqlens: torch.Tensor | None, total: int) -> torch.Tensor:
    """Modulation rows ready to broadcast against ``(total, C)`` tokens (the ``torch`` backends).

    Per-token rows (``cu_seqlens=None``) as they are; one sample's ``(1, C)`` row as it is (it
    broadcasts, no copy); several samples' rows gathered to one row per token.
    """
    if cu_seqlens is None or mod.shape[0] == 1:
        return mod
    return mod[sample_index(cu_seqlens, total)]


def add_mul(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``base + a * b`` (the ``torch`` backends' modulations and gated residuals).

    One ``addcmul`` pass when nothing needs a gradient; a multiply and an add when something
    does, because addcmul's backward multiplies by its ``value`` too: two extra passes over the
    tokens, 1.25-1.4x slower than the mul + add backward on a CPU (torch 2.13, 8192 x 1024)."""
    if torch.is_grad_enabled() and (base.requires_grad or a.requires_grad or b.requires_grad):
        return base + a * b
    return torch.addcmul(base, a, b)


def rms_rows(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * weight`` for ``x`` already in its compute dtype (the
    ``torch`` backends' RMSNorm). One fused reduction (``vector_norm``) and one or two passes: on
    CPUs ``F.rms_norm`` is a composite of four passes, 2.2x slower at 4096 x 3072 (torch 2.13)."""
    inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square().div(x.shape[-1]).add(eps).rsqrt()
    out = x * inv
    if weight is None:
        return out
    if torch.is_grad_enabled() and (out.requires_grad or weight.requires_grad):
        return out * weight  # autograd keeps x * inv for the weight's gradient
    return out.mul_(weight)

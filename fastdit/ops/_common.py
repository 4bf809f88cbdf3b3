"""Shapes shared by the public ops: the packed-or-dense convention and per-sample / per-token
modulation rows. The backends' registration helpers are in :mod:`fastdit.ops._registry`."""

import torch

from fastdit.ops.validation import check_cu_seqlens, check_tensor
from fastdit.reference.common import dense_cu_seqlens


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
        return x.reshape(batch * seqlen, *x.shape[2:]), dense_cu_seqlens(batch, seqlen, x.device)
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

"""Helpers the references share: the packed ("varlen") layout and the compute dtype."""

import torch


def sample_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Sample id of every packed token: ``(total,) int64`` with ``cu[b] <= i < cu[b + 1]``.

    Computed on the device by binary search, so it needs no host sync (torch.compile friendly).
    Empty samples are skipped naturally: ``right=True`` puts token ``i`` after every boundary <= i.
    """
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=torch.int64)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), tokens, right=True)


def per_token(mod: torch.Tensor, cu_seqlens: torch.Tensor | None, total: int) -> torch.Tensor:
    """Expand per-sample rows ``(B, ...)`` to per-token rows ``(total, ...)``.

    ``cu_seqlens=None`` means ``mod`` already has one row per token.
    """
    if cu_seqlens is None:
        return mod
    return mod[sample_index(cu_seqlens, total)]


def per_sample_sum(values: torch.Tensor, cu_seqlens: torch.Tensor | None, num_rows: int) -> torch.Tensor:
    """Reduce per-token rows ``(total, ...)`` to per-sample sums ``(B, ...)`` (adjoint of per_token)."""
    if cu_seqlens is None:
        return values
    out = values.new_zeros((num_rows, *values.shape[1:]))
    return out.index_add_(0, sample_index(cu_seqlens, values.shape[0]), values)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """The reference's compute dtype: float32 for fp16/bf16/fp32 inputs, float64 kept (gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def dense_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens ``(B+1,) int32`` of a dense (B, S, ...) batch viewed as packed."""
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)

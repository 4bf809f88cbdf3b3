"""RMS norm over channels, then SiLU, in one pass (the Wan VAE's ``silu(RMS_norm(x))``).

x is viewed as rows of C contiguous channels (channels-last), each program normalizing BLOCK_R
rows: ``y = x / max(||x||, eps) * sqrt(C) * gamma``, then ``y * sigmoid(y)``, statistics and
math in fp32, one read and one write per element (eager PyTorch: normalize, scale, gamma and
SiLU are four passes and three intermediate tensors).
"""

import torch
import triton
import triton.language as tl

from fastdit.kernels.launch import contiguous, interpreting, launcher


@triton.jit
def rms_norm_silu_kernel(
    X, GAMMA, OUT, n_rows, n_cols, eps, scale,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offs = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    # not tl.maximum, which returns eps for a NaN norm: a NaN row stays NaN, as F.normalize's clamp_min
    inv = scale / tl.where(norm < eps, eps, norm)
    gamma = tl.load(GAMMA + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = x * inv[:, None] * gamma[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


def rms_norm_silu_forward(x: torch.Tensor, gamma: torch.Tensor, eps: float, silu: bool) -> torch.Tensor:
    """x (B, C, ...) any memory format -> the same shape in x's dtype, channels-last in memory.

    The kernel normalises rows of C contiguous channels: x with channels moved last is a view
    when x is channels-last, else a copy."""
    rows = x.movedim(1, -1)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = _forward_rows(rows.view(rows.shape[:-1].numel(), x.shape[1]), gamma, eps, silu)
    return out.view(rows.shape).movedim(-1, 1)


def _forward_rows(x_rows: torch.Tensor, gamma: torch.Tensor, eps: float, silu: bool) -> torch.Tensor:
    """x_rows (N, C) contiguous -> (N, C) in x's dtype."""
    n_rows, n_cols = x_rows.shape
    out = torch.empty_like(x_rows)
    if n_rows == 0 or n_cols == 0:
        return out
    (gamma,) = contiguous(gamma)
    block_c = triton.next_power_of_2(n_cols)
    # About 4K elements per program: whole rows in registers, several rows per program at small C.
    block_r = max(1, min(64, 4096 // block_c)) if not interpreting() else max(1, min(8, 256 // block_c))
    grid = (triton.cdiv(n_rows, block_r),)
    launcher(rms_norm_silu_kernel)[grid](
        x_rows, gamma, out, n_rows, n_cols, eps, float(n_cols) ** 0.5,
        BLOCK_R=block_r, BLOCK_C=block_c, SILU=silu, num_warps=4 if block_c * block_r <= 4096 else 8,
    )  # fmt: skip
    return out

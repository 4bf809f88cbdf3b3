"""3D rotary position embedding (Wan 2.1 semantics, generalised to any theta / axis split / layout).

A token at patch position (t, h, w) rotates the pairs of its head dimension: the first
``axes_dim[0] // 2`` pairs by ``t * freq``, the next ``axes_dim[1] // 2`` by ``h * freq``, the last
``axes_dim[2] // 2`` by ``w * freq``, with ``freq_i = theta ** (-2 i / axes_dim[axis])`` inside
each axis. ``interleaved=True`` pairs (2i, 2i+1) (Wan, HunyuanVideo); ``interleaved=False``
pairs (i, i + D/2) (the half-rotation layout of Open-Sora 2.0), with the same i-th frequency.

Precision: frequencies and angles are float64 (as Wan's original), cos/sin are rounded to
float32 (kept float64 for float64 x), the rotation runs in that dtype and the result is cast to x.dtype.
"""

import torch

from fastdit.reference.common import sample_index, upcast


def wan_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of a head dim into (t, h, w) rotary sizes: (d - 4(d//6), 2(d//6), 2(d//6))."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope3d_angles(
    grid_thw: torch.Tensor,
    cu_seqlens: torch.Tensor,
    total: int,
    *,
    theta: float,
    axes_dim: tuple[int, int, int] | list[int],
    token_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotation angle of every (token, pair): ``(total, sum(axes_dim) // 2) float64``.

    Token j of sample b has global index ``g = token_offset[b] + j`` and position
    ``(g // (h w), (g // w) % h, g % w)``; tokens with ``g >= t h w`` get angle 0 (no rotation).
    """
    device = grid_thw.device
    seg = sample_index(cu_seqlens, total)
    local = torch.arange(total, device=device, dtype=torch.int64) - cu_seqlens.to(torch.int64)[seg]
    if token_offset is not None:
        local = local + token_offset.to(device=device, dtype=torch.int64)[seg]
    thw = grid_thw.to(torch.int64)[seg]
    t, h, w = thw.unbind(-1)
    valid = local < t * h * w
    pos = torch.stack([local // (h * w), (local // w) % h, local % w], dim=-1).to(torch.float64)
    angles = []
    for axis, dim in enumerate(axes_dim):
        exponent = torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim
        freq = theta**-exponent
        angles.append(pos[:, axis, None] * freq[None, :])
    angle = torch.cat(angles, dim=-1)
    return torch.where(valid[:, None], angle, torch.zeros_like(angle))


def rope3d_ref(
    x: torch.Tensor,
    grid_thw: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    theta: float = 10000.0,
    axes_dim: tuple[int, int, int] | list[int] | None = None,
    interleaved: bool = True,
    token_offset: torch.Tensor | None = None,
    conjugate: bool = False,
) -> torch.Tensor:
    """Rotate packed ``x: (total, H, D)``; ``conjugate=True`` rotates by -angle (the backward)."""
    total, _, head_dim = x.shape
    axes_dim = tuple(axes_dim) if axes_dim is not None else wan_axes_dim(head_dim)
    angle = rope3d_angles(grid_thw, cu_seqlens, total, theta=theta, axes_dim=axes_dim, token_offset=token_offset)
    xf = upcast(x)
    cos = angle.cos().to(xf.dtype)[:, None, :]
    sin = angle.sin().to(xf.dtype)[:, None, :]
    if conjugate:
        sin = -sin
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        half = head_dim // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)

"""Rotary embedding from cos / sin tables: the form every video DiT family's RoPE reduces to.

``x (N, H, D)`` token ``n`` uses table row ``n % T`` of ``cos, sin (T, Hc, P)`` (``Hc`` is 1 or H:
one table for every head, or one per head as Mochi's and LTX-2's split RoPE). The first
``R = 2P`` features of each head rotate in pairs, the rest pass through:

- ``interleaved=True``: pair p is ``(x[2p], x[2p + 1])`` (HunyuanVideo, CogVideoX, LTX, Mochi, Wan);
- ``interleaved=False``: pair p is ``(x[p], x[p + P])`` (Cosmos, LTX-2's split RoPE, Open-Sora).

``(a, b) -> (a cos - b sin, a sin + b cos)``; ``conjugate=True`` rotates by the negative angle
(the backward). Math in ``promote(x, tables, float32)``, result in ``x.dtype``.
"""

import torch


def rotary_tables_ref(positions: torch.Tensor, axes_dim, theta, *, freqs=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` float64 ``(N, sum(axes_dim) / 2)`` for positions ``(N, A)`` (fractional allowed):
    axis ``a`` owns ``axes_dim[a] / 2`` consecutive pairs with angle ``pos[a] * f`` for its
    frequencies ``f_j = theta[a] ** (-2 j / axes_dim[a])`` (``theta`` a number or one per axis),
    or the given ``freqs[a]``."""
    positions = positions.to(torch.float64)
    thetas = [theta] * len(axes_dim) if isinstance(theta, (int, float)) else list(theta)
    angles = []
    for axis, dim in enumerate(axes_dim):
        if freqs is not None:
            f = torch.as_tensor(freqs[axis], dtype=torch.float64, device=positions.device)
        else:
            f = float(thetas[axis]) ** -(torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
        angles.append(positions[:, axis, None] * f[None, :])
    angle = torch.cat(angles, dim=-1)
    return angle.cos(), angle.sin()


def rotary_ref(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool, conjugate: bool = False
) -> torch.Tensor:
    acc = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32)
    n, heads, dim = x.shape
    table_rows, _, pairs = cos.shape
    rows = torch.arange(n, device=x.device) % table_rows
    c = cos.to(acc)[rows].expand(n, heads, pairs)
    s = sin.to(acc)[rows].expand(n, heads, pairs)
    if conjugate:
        s = -s
    return rotate_pairs(x.to(acc), c, s, interleaved).to(x.dtype)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``x (..., D)`` with its first ``2P`` features rotated by ``cos, sin (..., P)`` (broadcast),
    in x's dtype; the rest of each row passes through."""
    pairs = cos.shape[-1]
    if interleaved:
        a, b = x[..., 0 : 2 * pairs : 2], x[..., 1 : 2 * pairs : 2]
        turned = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    else:
        a, b = x[..., :pairs], x[..., pairs : 2 * pairs]
        turned = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return turned if 2 * pairs == x.shape[-1] else torch.cat([turned, x[..., 2 * pairs :]], dim=-1)

"""3D rotary embedding kernel: q and (optionally) k of one token per program, both layouts.

Positions come from the token's index in its sample (cu_seqlens, token_offset) and the sample's
(t, h, w) grid, computed in-kernel; angles are ``pos * inv_freq[pair]`` in float64 (as Wan's
original and fastdit's reference), cos/sin rounded to float32, rotation in float32. The only
table is ``inv_freq``: D/2 float64 entries, never a [tokens, D] table.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    X,
    OUT,
    n_heads,
    stride_h,
    stride_oh,
    cos,
    sin,
    pair,
    pair_mask,
    HALF_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    mask = (heads < n_heads) & pair_mask[None, :]
    if INTERLEAVED:  # pairs (2i, 2i + 1)
        i1 = 2 * pair
        i2 = 2 * pair + 1
    else:  # pairs (i, i + D/2)
        i1 = pair
        i2 = pair + HALF_D
    x1 = tl.load(X + heads * stride_h + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + heads * stride_h + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    c = cos[None, :]
    s = sin[None, :]
    out_ty = OUT.dtype.element_ty
    tl.store(OUT + heads * stride_oh + i1[None, :], (x1 * c - x2 * s).to(out_ty), mask=mask)
    tl.store(OUT + heads * stride_oh + i2[None, :], (x1 * s + x2 * c).to(out_ty), mask=mask)


@triton.jit
def rope3d_kernel(
    # pointers
    Q,
    K,
    Q_OUT,
    K_OUT,
    CU_SEQLENS,  # (B+1,) int32
    GRID_THW,  # (B, 3) int32/int64, contiguous
    TOKEN_OFFSET,  # (B,) or unused
    INV_FREQ,  # (D/2,) float64: per pair, theta^(-2i/d_axis)
    # sizes
    num_samples,
    q_heads,
    k_heads,
    # strides, in elements (the head dim is contiguous)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    # constexprs: the pair layout fixes the load pattern; the axis split fixes where t/h/w switch
    HALF_D: tl.constexpr,
    T_PAIRS: tl.constexpr,  # dt / 2
    TH_PAIRS: tl.constexpr,  # (dt + dh) / 2
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_K: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,  # backward: rotate by -angle
):
    token = tl.program_id(0).to(tl.int64)
    # The token's sample: how many samples after the first start at or before it.
    seg = 0
    for b in range(1, num_samples):
        seg += (tl.load(CU_SEQLENS + b) <= token).to(tl.int32)
    local = token - tl.load(CU_SEQLENS + seg).to(tl.int64)
    if HAS_OFFSET:
        local += tl.load(TOKEN_OFFSET + seg).to(tl.int64)
    t = tl.load(GRID_THW + seg * 3).to(tl.int64)
    h = tl.load(GRID_THW + seg * 3 + 1).to(tl.int64)
    w = tl.load(GRID_THW + seg * 3 + 2).to(tl.int64)
    valid = local < t * h * w  # tokens past t*h*w are not rotated
    pt = local // (h * w)
    ph = (local // w) % h
    pw = local % w

    pair = tl.arange(0, BLOCK_P)
    pair_mask = pair < HALF_D
    pos = tl.where(pair < T_PAIRS, pt, tl.where(pair < TH_PAIRS, ph, pw)).to(tl.float64)
    inv_freq = tl.load(INV_FREQ + pair, mask=pair_mask, other=0.0)
    angle = tl.where(valid, pos * inv_freq, 0.0)
    cos = tl.cos(angle).to(tl.float32)
    sin = tl.sin(angle).to(tl.float32)
    if CONJUGATE:
        sin = -sin
    _rotate_heads(
        Q + token * stride_qt, Q_OUT + token * stride_qot, q_heads, stride_qh, stride_qoh,
        cos, sin, pair, pair_mask, HALF_D, BLOCK_H, INTERLEAVED,
    )  # fmt: skip
    if HAS_K:
        _rotate_heads(
            K + token * stride_kt, K_OUT + token * stride_kot, k_heads, stride_kh, stride_koh,
            cos, sin, pair, pair_mask, HALF_D, BLOCK_H, INTERLEAVED,
        )  # fmt: skip


def inv_freq_table(theta: float, axes_dim, device) -> torch.Tensor:
    """(D/2,) float64: for each rotated pair, ``theta ** (-2 i / d_axis)`` within its axis."""
    return torch.cat([theta ** -(torch.arange(0, d, 2, dtype=torch.float64, device=device) / d) for d in axes_dim])


def rope3d_launch(
    q: torch.Tensor,
    k: torch.Tensor | None,
    q_out: torch.Tensor,
    k_out: torch.Tensor | None,
    grid_thw: torch.Tensor,
    cu_seqlens: torch.Tensor,
    token_offset: torch.Tensor | None,
    theta: float,
    axes_dim,
    interleaved: bool,
    conjugate: bool,
) -> None:
    """Rotate packed ``q (total, Hq, D)`` (and ``k (total, Hk, D)``) into ``q_out`` / ``k_out``.

    Outputs may alias the inputs (in place). Every tensor's last dim must be contiguous.
    """
    total, q_heads, head_dim = q.shape
    if total == 0:
        return
    k_heads = 0 if k is None else k.shape[1]
    inv_freq = inv_freq_table(theta, axes_dim, q.device)
    dt, dh, _ = axes_dim
    kk, kk_out = (q, q_out) if k is None else (k, k_out)
    torch.library.wrap_triton(rope3d_kernel)[(total,)](
        q, kk, q_out, kk_out, cu_seqlens, grid_thw.contiguous(),
        cu_seqlens if token_offset is None else token_offset, inv_freq,
        cu_seqlens.shape[0] - 1, q_heads, k_heads,
        q.stride(0), q.stride(1), kk.stride(0), kk.stride(1),
        q_out.stride(0), q_out.stride(1), kk_out.stride(0), kk_out.stride(1),
        HALF_D=head_dim // 2,
        T_PAIRS=dt // 2,
        TH_PAIRS=(dt + dh) // 2,
        BLOCK_H=triton.next_power_of_2(max(q_heads, k_heads)),
        BLOCK_P=triton.next_power_of_2(head_dim // 2),
        HAS_K=k is not None,
        HAS_OFFSET=token_offset is not None,
        INTERLEAVED=interleaved,
        CONJUGATE=conjugate,
    )  # fmt: skip

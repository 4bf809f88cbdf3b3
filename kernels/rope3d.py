"""3D rotary embedding kernel: q and (optionally) k of one token per program, both layouts.

Positions come from the token's index in its sample (cu_seqlens, token_offset) and the sample's
(t, h, w) grid, computed in-kernel; angles are ``pos * inv_freq[pair]`` in float64 (as Wan's
original and fastdit's reference), cos/sin rounded to float32, rotation in float32. The only
table is ``inv_freq``: D/2 float64 entries, never a [tokens, D] table.
"""

import torch
import triton
import triton.language as tl

from fastdit.kernels.launch import contiguous, launcher


@triton.jit
def _sum_squares(X, n_heads, stride_h, HALF_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Sum of x^2 over all heads of one token (the RMS statistic of a norm across heads)."""
    col = tl.arange(0, 2 * BLOCK_P)[None, :]
    total = tl.zeros([BLOCK_H, 2 * BLOCK_P], dtype=tl.float32)
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)[:, None]
        mask = (heads < n_heads) & (col < 2 * HALF_D)
        x = tl.load(X + heads * stride_h + col, mask=mask, other=0.0).to(tl.float32)
        total += x * x
    return tl.sum(tl.sum(total, axis=1), axis=0)


@triton.jit
def _normalized(x, W, heads, col, mask, rstd, head_dim, NORM: tl.constexpr, OUT_TY: tl.constexpr):
    """RMSNorm across heads (weight W over H*D), rounded to the output dtype as the unfused pair
    stores it; x itself when NORM is off."""
    if NORM:
        w = tl.load(W + heads * head_dim + col, mask=mask, other=0.0).to(tl.float32)
        x = (x * rstd * w).to(OUT_TY).to(tl.float32)
    return x


@triton.jit
def _rotate_heads(
    X,
    OUT,
    W,  # (H * D,) norm weight, NORM only
    n_heads,
    stride_h,
    stride_oh,
    cos,
    sin,
    rstd,
    HALF_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    NORM: tl.constexpr,
):
    """Rotate the heads of one token, BLOCK_H heads at a time (bounded registers for 40 heads)."""
    pair = tl.arange(0, BLOCK_P)
    c = cos[None, :]
    s = sin[None, :]
    out_ty = OUT.dtype.element_ty
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)[:, None]
        if INTERLEAVED:  # pairs (2i, 2i + 1): load whole contiguous rows, split them into pairs
            col = tl.arange(0, 2 * BLOCK_P)[None, :]
            mask = (heads < n_heads) & (col < 2 * HALF_D)
            x = tl.load(X + heads * stride_h + col, mask=mask, other=0.0).to(tl.float32)
            x = _normalized(x, W, heads, col, mask, rstd, 2 * HALF_D, NORM, out_ty)
            x1, x2 = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_P, 2]))
            out = tl.reshape(tl.join(x1 * c - x2 * s, x1 * s + x2 * c), [BLOCK_H, 2 * BLOCK_P])
            tl.store(OUT + heads * stride_oh + col, out.to(out_ty), mask=mask)
        else:  # pairs (i, i + D/2): two contiguous half rows
            mask = (heads < n_heads) & (pair[None, :] < HALF_D)
            first = X + heads * stride_h + pair[None, :]
            x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(first + HALF_D, mask=mask, other=0.0).to(tl.float32)
            x1 = _normalized(x1, W, heads, pair[None, :], mask, rstd, 2 * HALF_D, NORM, out_ty)
            x2 = _normalized(x2, W, heads, pair[None, :] + HALF_D, mask, rstd, 2 * HALF_D, NORM, out_ty)
            dst = OUT + heads * stride_oh + pair[None, :]
            tl.store(dst, (x1 * c - x2 * s).to(out_ty), mask=mask)
            tl.store(dst + HALF_D, (x1 * s + x2 * c).to(out_ty), mask=mask)


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
    Q_W,  # (Hq * D,) RMSNorm weight across q's heads, NORM only
    K_W,
    # sizes
    num_samples,
    q_heads,
    k_heads,
    eps,
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
    BLOCK_H: tl.constexpr,  # heads rotated at a time
    BLOCK_P: tl.constexpr,  # next power of two >= D/2
    HAS_K: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,  # backward: rotate by -angle
    NORM: tl.constexpr,  # RMSNorm q and k across heads (weights Q_W, K_W) before rotating
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
    rstd = 1.0
    if NORM:  # one extra read of the token's row (6 KB at 24 x 128 bf16: served by L1 / L2)
        rstd = 1.0 / tl.sqrt(_sum_squares(Q + token * stride_qt, q_heads, stride_qh, HALF_D, BLOCK_H, BLOCK_P)
                             / (q_heads * 2 * HALF_D) + eps)  # fmt: skip
    _rotate_heads(
        Q + token * stride_qt, Q_OUT + token * stride_qot, Q_W, q_heads, stride_qh, stride_qoh,
        cos, sin, rstd, HALF_D, BLOCK_H, BLOCK_P, INTERLEAVED, NORM,
    )  # fmt: skip
    if HAS_K:
        if NORM:
            rstd = 1.0 / tl.sqrt(_sum_squares(K + token * stride_kt, k_heads, stride_kh, HALF_D, BLOCK_H, BLOCK_P)
                                 / (k_heads * 2 * HALF_D) + eps)  # fmt: skip
        _rotate_heads(
            K + token * stride_kt, K_OUT + token * stride_kot, K_W, k_heads, stride_kh, stride_koh,
            cos, sin, rstd, HALF_D, BLOCK_H, BLOCK_P, INTERLEAVED, NORM,
        )  # fmt: skip


# Heads per step: 8 x 128 bf16 = 2 KB per step: 16-byte accesses per thread at 4 warps, 64 registers
# (the sm_90 compile of tests/kernels shows 32 heads at once spilling 944 bytes).
ROPE_BLOCK_H = 8


def inv_freq_table(theta: float, axes_dim, device) -> torch.Tensor:
    """(D/2,) float64: for each rotated pair, ``theta ** (-2 i / d_axis)`` within its axis."""
    return torch.cat([theta ** -(torch.arange(0, d, 2, dtype=torch.float64, device=device) / d) for d in axes_dim])


def rope3d_forward(
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
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> None:
    """Rotate packed ``q (total, Hq, D)`` (and ``k (total, Hk, D)``) into ``q_out`` / ``k_out``.

    With norm weights ``(H * D,)``, RMSNorm each token's q (k) across all heads first (fp32
    statistics, result rounded to the output dtype, then rotated). Outputs may alias the inputs
    (in place). Every tensor's last dim must be contiguous.
    """
    total, q_heads, head_dim = q.shape
    k_heads = 0 if k is None else k.shape[1]
    if total == 0 or head_dim == 0 or max(q_heads, k_heads) == 0:  # nothing to rotate
        return
    inv_freq = inv_freq_table(theta, axes_dim, q.device)
    dt, dh, _ = axes_dim
    kk, kk_out = (q, q_out) if k is None else (k, k_out)
    cu_seqlens, grid_thw, token_offset, q_norm_weight, k_norm_weight = contiguous(
        cu_seqlens, grid_thw, token_offset, q_norm_weight, k_norm_weight
    )
    launcher(rope3d_kernel)[(total,)](
        q, kk, q_out, kk_out, cu_seqlens, grid_thw,
        cu_seqlens if token_offset is None else token_offset, inv_freq,
        q if q_norm_weight is None else q_norm_weight, kk if k_norm_weight is None else k_norm_weight,
        cu_seqlens.shape[0] - 1, q_heads, k_heads, norm_eps,
        q.stride(0), q.stride(1), kk.stride(0), kk.stride(1),
        q_out.stride(0), q_out.stride(1), kk_out.stride(0), kk_out.stride(1),
        HALF_D=head_dim // 2,
        T_PAIRS=dt // 2,
        TH_PAIRS=(dt + dh) // 2,
        BLOCK_H=min(ROPE_BLOCK_H, triton.next_power_of_2(max(q_heads, k_heads))),
        BLOCK_P=triton.next_power_of_2(head_dim // 2),
        HAS_K=k is not None,
        HAS_OFFSET=token_offset is not None,
        INTERLEAVED=interleaved,
        CONJUGATE=conjugate,
        NORM=q_norm_weight is not None,
    )  # fmt: skip

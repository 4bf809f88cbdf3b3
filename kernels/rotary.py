"""Rotary embedding from cos / sin tables (semantics: fastdit.reference.rotary).

One program rotates BLOCK_H heads of one token: it reads the token's table row once (shared by
every head, or one row per head), the pairs of each head in the interleaved or half-split
layout, and copies the features past the rotated ones. Math in float32, one read and one write
of x: a memory-bound kernel whose floor is x's bytes twice plus the table's.
"""

import torch
import triton
import triton.language as tl

from fastdit.kernels.launch import launcher


@triton.jit
def rotary_kernel(
    X,
    OUT,
    COS,
    SIN,
    n_heads,
    table_rows,
    stride_xn,
    stride_xh,
    stride_on,
    stride_oh,
    stride_ct,
    stride_ch,  # 0 when one table row serves every head
    SIGN: tl.constexpr,  # 1, or -1 for the conjugate rotation (the backward)
    PAIRS: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_REST: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    pair = tl.arange(0, BLOCK_P)[None, :]
    row = token % table_rows
    head_ok = heads < n_heads
    mask = head_ok & (pair < PAIRS)
    table = row * stride_ct + heads * stride_ch + pair
    c = tl.load(COS + table, mask=mask, other=1.0).to(tl.float32)
    s = tl.load(SIN + table, mask=mask, other=0.0).to(tl.float32) * SIGN
    if INTERLEAVED:
        first, second = 2 * pair, 2 * pair + 1
    else:
        first, second = pair, pair + PAIRS
    x_row = X + token * stride_xn + heads * stride_xh
    o_row = OUT + token * stride_on + heads * stride_oh
    a = tl.load(x_row + first, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_row + second, mask=mask, other=0.0).to(tl.float32)
    out_ty = OUT.dtype.element_ty
    tl.store(o_row + first, (a * c - b * s).to(out_ty), mask=mask)
    tl.store(o_row + second, (a * s + b * c).to(out_ty), mask=mask)
    if BLOCK_REST > 0:  # features past the rotated ones pass through
        rest = 2 * PAIRS + tl.arange(0, BLOCK_REST)[None, :]
        keep = head_ok & (rest < DIM)
        tl.store(o_row + rest, tl.load(x_row + rest, mask=keep, other=0.0), mask=keep)


def rotary_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, conjugate: bool):
    """x ``(N, H, D)`` (last dim contiguous), cos / sin ``(T, Hc, P)`` (last dim contiguous, same
    strides) -> a new contiguous ``(N, H, D)``."""
    n, heads, dim = x.shape
    table_rows, table_heads, pairs = cos.shape
    out = torch.empty((n, heads, dim), dtype=x.dtype, device=x.device)
    if n == 0 or heads == 0:
        return out
    block_h = min(triton.next_power_of_2(heads), max(1, 4096 // triton.next_power_of_2(max(dim, 1))))
    rest = dim - 2 * pairs
    grid = (n, triton.cdiv(heads, block_h))
    launcher(rotary_kernel)[grid](
        x, out, cos, sin, heads, table_rows,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        cos.stride(0), cos.stride(1) if table_heads > 1 else 0,
        SIGN=-1 if conjugate else 1, PAIRS=pairs, DIM=dim,
        BLOCK_P=triton.next_power_of_2(max(pairs, 1)),
        BLOCK_REST=triton.next_power_of_2(rest) if rest > 0 else 0,
        BLOCK_H=block_h, INTERLEAVED=interleaved,
    )  # fmt: skip
    return out

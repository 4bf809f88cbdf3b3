"""Variable-length flash attention (FlashAttention-2 schedule) for packed batches.

Forward: one program per (query block, head, sample), samples longest first; online softmax in the exp2 domain over the
sample's key blocks only, so a packed batch costs exactly the sum of its samples' attention.
Writes out and the natural-log LSE ``(H, total_q)``. Rows that see no key (bottom-right causal
with Lq > Lk) output 0 with LSE = -inf.

Backward: a preprocess kernel (delta = rowsum(dO * O)), a dK/dV kernel (one program per key
block and KV head, looping over the query heads of its GQA group and the query blocks that see
it) and a dQ kernel (one program per query block and head). No atomics: deterministic.

Opt-in forward variants, off until an H100 run shows they pay, chosen by the caller's arguments
(fastdit's settings ``attn_tma``, ``attn_persistent``, ``attn_ws``, ``attn_bwd_ws``): K / V by TMA
(``tma``), a persistent longest-first schedule (``persistent``) and Triton's Hopper warp
specialization of the key loop (``warp_specialize``: a TMA producer warpgroup and two consumer
warpgroups); they compose. The backward's ``warp_specialize`` specializes its kernels the same way.
``autotune=False`` keeps the fixed tiles of ``_tiles``.

Head dims are padded to a power of two >= 16 with masks (72, 96 run natively on padded tiles).
Offsets are int64. fp32 inputs use IEEE fp32 dots (tests), fp16/bf16 the tensor cores.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastdit.kernels.launch import contiguous, interpreting, launcher, use_device_tma_descriptors

LOG2E = 1.4426950408889634
ALIGN_ROWS = 128  # sample alignment of the warp-specialized backward's lse / delta copies


@triton.jit
def _sample_bounds(CU, b):
    start = tl.load(CU + b).to(tl.int64)
    return start, tl.load(CU + b + 1).to(tl.int64) - start


@triton.jit
def _kv_tiles(k_src, v_src, k_start, n0, kv_h, cols, len_k, d, d_mask,
              stride_kt, stride_kh, stride_vt, stride_vh, USE_TMA: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """The (BLOCK_N, BLOCK_D) k and v tiles of key block n0. ``k_src`` / ``v_src`` are k and v's
    tensor descriptors when USE_TMA, else their base pointers, read by masked loads (rows past
    the sample only when MASKED; columns past D always)."""
    if USE_TMA:
        row0 = (k_start + n0).to(tl.int32)
        k = k_src.load([row0, (kv_h * stride_kh).to(tl.int32)])
        v = v_src.load([row0, (kv_h * stride_vh).to(tl.int32)])
    else:
        kv_mask = d_mask[None, :]
        if MASKED:
            kv_mask = (cols < len_k)[:, None] & kv_mask
        k = tl.load(k_src + (k_start + cols)[:, None] * stride_kt + kv_h * stride_kh + d[None, :], mask=kv_mask,
                    other=0.0)  # fmt: skip
        v = tl.load(v_src + (k_start + cols)[:, None] * stride_vt + kv_h * stride_vh + d[None, :], mask=kv_mask,
                    other=0.0)  # fmt: skip
    return k, v


@triton.jit
def _online_softmax_step(q, k, v, m_i, l_i, acc, cols, rows, len_k, offset, scale_log2,
                         MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """One key block of the exp2-domain online softmax. MASKED: keys past the sample (and past the
    diagonal when causal) score -inf, and rows with no visible key yet keep m = -inf; unmasked
    blocks are seen whole by every row, so neither the masks nor the -inf guard are needed."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    if MASKED:
        visible = (cols < len_k)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + offset)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_tile(
    Q, K, V, OUT, LSE, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    group, head_dim, scale_log2, total_k, kv_width,
    m_block, h, b, q_start, len_q,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr = False,
    total_q=0, q_width=0,
    SPLIT: tl.constexpr = True,  # whole key blocks in an unmasked loop first (see n_full below)
):  # fmt: skip
    """One (query block, head, sample) tile: online softmax over the sample's key blocks."""
    k_start, len_k = _sample_bounds(CU_K, b)
    kv_h = h // group
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_mask = rows < len_q
    d_mask = d < head_dim
    if WARP_SPECIALIZE:
        # The specialized loop's producer issues only TMA copies, so q comes by TMA too: a box of
        # (total_q, H * D) whose rows past the sample are unstored and whose columns past D
        # (padded head dims: the next head's) are zeroed here, as the masked load would.
        q_desc = tl.make_tensor_descriptor(Q, shape=[total_q, q_width], strides=[stride_qt, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])  # fmt: skip
        q = q_desc.load([(q_start + m_block * BLOCK_M).to(tl.int32), (h * stride_qh).to(tl.int32)])
        q = tl.where(d_mask[None, :], q, 0.0)
    else:
        q = tl.load(
            Q + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offset = len_k - len_q  # bottom-right causal: key j is visible to row i iff j <= i + offset
    n_end = len_k
    if CAUSAL:
        n_end = tl.maximum(tl.minimum(len_k, (m_block + 1) * BLOCK_M + offset), 0)
    if WARP_SPECIALIZE:  # empty query blocks run no key block (the caller cannot return early)
        n_end = tl.where(m_block * BLOCK_M >= len_q, 0, n_end)
    k_src, v_src = K, V
    if USE_TMA:
        # Boxes of [BLOCK_N, BLOCK_D] from k / v seen as (total_k, Hk * D). Rows past this sample
        # are the next sample's (finite; their scores are masked to -inf below), rows past the
        # tensor and columns past the row are zero-filled; columns past D (padded head dims) are
        # the next head's, which meet zero-padded q columns and land in unstored output columns.
        k_src = tl.make_tensor_descriptor(K, shape=[total_k, kv_width], strides=[stride_kt, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])  # fmt: skip
        v_src = tl.make_tensor_descriptor(V, shape=[total_k, kv_width], strides=[stride_vt, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])  # fmt: skip
    n_full = 0  # key blocks every row of this tile sees whole: no masks, no -inf
    # The specialized kernel keeps one loop, masked throughout; so does the persistent one, whose
    # outer tile loop leaves no registers for a second copy of the body (40 B spilled at D = 64).
    if SPLIT and not WARP_SPECIALIZE:
        n_full = len_k // BLOCK_N * BLOCK_N
        if CAUSAL:  # ... and below the diagonal for the tile's first row
            n_full = tl.minimum(n_full, tl.maximum(m_block * BLOCK_M + offset + 1, 0) // BLOCK_N * BLOCK_N)
        for n0 in range(0, n_full, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            k, v = _kv_tiles(k_src, v_src, k_start, n0, kv_h, cols, len_k, d, d_mask,
                             stride_kt, stride_kh, stride_vt, stride_vh, USE_TMA, False)  # fmt: skip
            m_i, l_i, acc = _online_softmax_step(q, k, v, m_i, l_i, acc, cols, rows, len_k, offset, scale_log2,
                                                 False, CAUSAL, PRECISION)  # fmt: skip
    for n0 in tl.range(n_full, n_end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        cols = n0 + tl.arange(0, BLOCK_N)
        k, v = _kv_tiles(k_src, v_src, k_start, n0, kv_h, cols, len_k, d, d_mask,
                         stride_kt, stride_kh, stride_vt, stride_vh, USE_TMA, True)  # fmt: skip
        m_i, l_i, acc = _online_softmax_step(q, k, v, m_i, l_i, acc, cols, rows, len_k, offset, scale_log2,
                                             True, CAUSAL, PRECISION)  # fmt: skip
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
    tl.store(
        OUT + (q_start + rows)[:, None] * stride_ot + h * stride_oh + d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )
    tl.store(LSE + h * stride_lh + q_start + rows, lse, mask=row_mask)


@triton.jit
def attn_fwd_kernel(
    # pointers
    Q, K, V, OUT, LSE, CU_Q, CU_K,
    ORDER,  # (B,) int: samples longest first; program axis 2 walks it so heavy samples start first
    # strides in elements: token and head of q, k, v, o; head of lse
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    # sizes
    group, head_dim, scale_log2,
    total_k, kv_width,  # rows and row length (Hk * D) of k / v, for the TMA descriptors
    # constexprs: tile shape fixes the MMA shapes; CAUSAL prunes key blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    SEQLEN_BUCKET: tl.constexpr,  # log2 of max_seqlen_q: only an autotuning key
    USE_TMA: tl.constexpr = False,  # K / V tiles by TMA (tensor descriptors) instead of masked loads
    WARP_SPECIALIZE: tl.constexpr = False,  # Hopper warp specialization of the key loop (q by TMA too)
    total_q=0,  # rows of q, for its TMA descriptor
):  # fmt: skip
    m_block = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.load(ORDER + tl.program_id(2))
    q_start, len_q = _sample_bounds(CU_Q, b)
    if not WARP_SPECIALIZE:  # an early return before the specialized loop does not compile (Triton 3.6)
        if m_block * BLOCK_M >= len_q:
            return
    _attn_fwd_tile(
        Q, K, V, OUT, LSE, CU_K,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
        group, head_dim, scale_log2, total_k, kv_width, m_block, h, b, q_start, len_q,
        BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL, PRECISION, USE_TMA, WARP_SPECIALIZE, total_q, kv_width * group,
    )  # fmt: skip


@triton.jit
def attn_fwd_persistent_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K, ORDER,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    group, head_dim, scale_log2, total_k, kv_width,
    num_samples, heads,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False,
    total_q=0,
):  # fmt: skip
    """Persistent schedule: a fixed grid (a few programs per SM) walks the tiles of every sample,
    longest sample first (ORDER), all heads of a query block before the next block, each program
    taking every num_programs-th tile. The tile list is never materialised: each program counts
    tiles per sample from cu_seqlens (B is small) to find a tile's sample."""
    total = 0
    for i in range(num_samples):
        b = tl.load(ORDER + i)
        len_q = tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)
        total += tl.cdiv(len_q, BLOCK_M) * heads
    for tile in range(tl.program_id(0), total, tl.num_programs(0)):
        slot = 0
        local = tile
        base = 0
        for i in range(num_samples):
            b = tl.load(ORDER + i)
            count = tl.cdiv(tl.load(CU_Q + b + 1) - tl.load(CU_Q + b), BLOCK_M) * heads
            here = (tile >= base) & (tile < base + count)
            slot = tl.where(here, i, slot)
            local = tl.where(here, tile - base, local)
            base += count
        b = tl.load(ORDER + slot)
        q_start, len_q = _sample_bounds(CU_Q, b)
        _attn_fwd_tile(
            Q, K, V, OUT, LSE, CU_K,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
            group, head_dim, scale_log2, total_k, kv_width, local // heads, (local % heads).to(tl.int64), b,
            q_start, len_q, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL, PRECISION, USE_TMA, WARP_SPECIALIZE,
            total_q, kv_width * group, SPLIT=False,
        )  # fmt: skip


@triton.jit
def attn_bwd_preprocess_kernel(
    OUT, DO, DELTA, CU_Q, ORDER,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
    head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    # warp-specialized backward: delta and a copy of lse with each sample starting at row
    # CU_ALIGNED[b] (a multiple of ALIGN_ROWS), so their TMA boxes start 16-byte aligned
    LSE=None, LSE_ALIGNED=None, CU_ALIGNED=None, stride_lh=0,
):  # fmt: skip
    m_block = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.load(ORDER + tl.program_id(2))
    q_start, len_q = _sample_bounds(CU_Q, b)
    if m_block * BLOCK_M >= len_q:
        return
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    mask = (rows < len_q)[:, None] & (d < head_dim)[None, :]
    o = tl.load(OUT + (q_start + rows)[:, None] * stride_ot + h * stride_oh + d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + (q_start + rows)[:, None] * stride_dot + h * stride_doh + d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if CU_ALIGNED is not None:
        start = tl.load(CU_ALIGNED + b).to(tl.int64)
        tl.store(DELTA + h * stride_dh + start + rows, delta, mask=rows < len_q)
        lse = tl.load(LSE + h * stride_lh + q_start + rows, mask=rows < len_q)
        tl.store(LSE_ALIGNED + h * stride_dh + start + rows, lse, mask=rows < len_q)
    else:
        tl.store(DELTA + h * stride_dh + q_start + rows, delta, mask=rows < len_q)


@triton.jit
def _dq_step(q, do, k, v, lse_log2, delta, dq, rows, cols, row_mask, len_k, offset, scale_log2,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """dQ plus one key block's share; ``lse_log2`` is the rows' lse in log2 units, +inf for a row
    that saw no key (its P is 0). MASKED zeroes P outside the sample (and above the diagonal).
    Unmasked blocks are seen whole by every row of the tile: rows past the sample have zero q and
    dO (P = 1 but dS = 0) and every real row has a finite lse."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    p = tl.exp2(s - lse_log2[:, None])
    if MASKED:
        visible = row_mask[:, None] & (cols < len_k)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + offset)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _dkdv_step(k, v, q, do, lse, delta, dk, dv, cols, rows, col_mask, row_mask, offset, scale_log2,
               CAUSAL: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """dK, dV plus one query block's share, in the transposed (keys x queries) orientation: no
    transposes of the large tiles."""
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2
    visible = col_mask[:, None] & row_mask[None, :]
    if CAUSAL:
        visible = visible & (cols[:, None] <= rows[None, :] + offset)
    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    p_t = tl.where(visible, tl.exp2(s_t - lse_log2[None, :]), 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_descriptors(Q, K, V, DO, LSE, DELTA, stride_qt, stride_kt, stride_vt, stride_dot, group,
                     total_q, total_k, kv_width, lse_numel,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """TMA descriptors of the warp-specialized backward kernels (dK/dV and dQ): q / dO and k / v
    as (tokens, heads x D) matrices, lse / delta as 1-D boxes of the preprocess's aligned copies."""
    q_desc = tl.make_tensor_descriptor(Q, shape=[total_q, kv_width * group], strides=[stride_qt, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])  # fmt: skip
    do_desc = tl.make_tensor_descriptor(DO, shape=[total_q, kv_width * group], strides=[stride_dot, 1],
                                        block_shape=[BLOCK_M, BLOCK_D])  # fmt: skip
    k_desc = tl.make_tensor_descriptor(K, shape=[total_k, kv_width], strides=[stride_kt, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])  # fmt: skip
    v_desc = tl.make_tensor_descriptor(V, shape=[total_k, kv_width], strides=[stride_vt, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])  # fmt: skip
    lse_desc = tl.make_tensor_descriptor(LSE, shape=[lse_numel], strides=[1], block_shape=[BLOCK_M])
    delta_desc = tl.make_tensor_descriptor(DELTA, shape=[lse_numel], strides=[1], block_shape=[BLOCK_M])
    return q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, ORDER,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_lh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    group, head_dim, scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    SEQLEN_BUCKET: tl.constexpr = 0,  # log2 of the longest sample: only an autotuning key
    WARP_SPECIALIZE: tl.constexpr = False,  # Hopper warp specialization: every load by TMA
    # with WARP_SPECIALIZE: extents for the TMA descriptors; LSE / DELTA are the preprocess's
    # aligned copies, sample b's rows starting at CU_ALIGNED[b]
    total_q=0, total_k=0, kv_width=0, lse_numel=0, CU_ALIGNED=None,
):  # fmt: skip
    n_block = tl.program_id(0)
    kv_h = tl.program_id(1).to(tl.int64)
    b = tl.load(ORDER + tl.program_id(2))
    k_start, len_k = _sample_bounds(CU_K, b)
    if not WARP_SPECIALIZE:  # an early return before the specialized loop does not compile
        if n_block * BLOCK_N >= len_k:
            return
    q_start, len_q = _sample_bounds(CU_Q, b)
    offset = len_k - len_q
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    col_mask = cols < len_k
    d_mask = d < head_dim
    kv_mask = col_mask[:, None] & d_mask[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_begin = 0
    if CAUSAL:  # the first query row that sees key n_block * BLOCK_N, rounded down to a block
        m_begin = tl.maximum(n_block * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
    if WARP_SPECIALIZE:
        # The producer partition lowers only TMA copies, so every tile comes by TMA: k / v zeroed
        # past the sample and past D (the next head's columns would meet q's in S); q / dO rows
        # and columns past the sample or D only reach masked probabilities or unstored dK / dV
        # columns; lse / delta are 1-D boxes of the preprocess's aligned, zero-padded copies.
        q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc = _bwd_descriptors(
            Q, K, V, DO, LSE, DELTA, stride_qt, stride_kt, stride_vt, stride_dot, group, total_q, total_k, kv_width,
            lse_numel, BLOCK_M, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        aligned = tl.load(CU_ALIGNED + b).to(tl.int64)
        row0 = (k_start + n_block * BLOCK_N).to(tl.int32)
        k = tl.where(kv_mask, k_desc.load([row0, (kv_h * stride_kh).to(tl.int32)]), 0.0)
        v = tl.where(kv_mask, v_desc.load([row0, (kv_h * stride_vh).to(tl.int32)]), 0.0)
        m_end = tl.where(n_block * BLOCK_N >= len_k, 0, len_q)  # empty key blocks run no query block
        blocks = tl.cdiv(tl.maximum(m_end - m_begin, 0), BLOCK_M)
        # One flat loop over (query head of the GQA group, query block): the pass aborts on the
        # nested loops of the plain kernel at 128-key tiles (WSDataPartition, Triton 3.6).
        for step in tl.range(0, group * blocks, warp_specialize=True):
            g = step // blocks
            h = kv_h * group + g
            m0 = m_begin + (step - g * blocks) * BLOCK_M
            rows = m0 + tl.arange(0, BLOCK_M)
            q0 = (q_start + m0).to(tl.int32)
            q = q_desc.load([q0, (h * stride_qh).to(tl.int32)])
            do = do_desc.load([q0, (h * stride_doh).to(tl.int32)])
            lse = lse_desc.load([(h * stride_lh + aligned + m0).to(tl.int32)])
            delta = delta_desc.load([(h * stride_lh + aligned + m0).to(tl.int32)])
            dk, dv = _dkdv_step(k, v, q, do, lse, delta, dk, dv, cols, rows, col_mask, rows < len_q, offset,
                                scale_log2, CAUSAL, PRECISION)  # fmt: skip
    else:
        k = tl.load(K + (k_start + cols)[:, None] * stride_kt + kv_h * stride_kh + d[None, :], mask=kv_mask,
                    other=0.0)  # fmt: skip
        v = tl.load(V + (k_start + cols)[:, None] * stride_vt + kv_h * stride_vh + d[None, :], mask=kv_mask,
                    other=0.0)  # fmt: skip
        for g in range(0, group):
            h = kv_h * group + g
            for m0 in range(m_begin, len_q, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                row_mask = rows < len_q
                q_mask = row_mask[:, None] & d_mask[None, :]
                q = tl.load(Q + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=q_mask,
                            other=0.0)  # fmt: skip
                do = tl.load(DO + (q_start + rows)[:, None] * stride_dot + h * stride_doh + d[None, :], mask=q_mask,
                             other=0.0)  # fmt: skip
                lse = tl.load(LSE + h * stride_lh + q_start + rows, mask=row_mask, other=0.0)
                delta = tl.load(DELTA + h * stride_lh + q_start + rows, mask=row_mask, other=0.0)
                dk, dv = _dkdv_step(k, v, q, do, lse, delta, dk, dv, cols, rows, col_mask, row_mask, offset,
                                    scale_log2, CAUSAL, PRECISION)  # fmt: skip
    tl.store(
        DK + (k_start + cols)[:, None] * stride_dkt + kv_h * stride_dkh + d[None, :],
        (dk * scale).to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + (k_start + cols)[:, None] * stride_dvt + kv_h * stride_dvh + d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, ORDER,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_lh,
    stride_dqt, stride_dqh,
    group, head_dim, scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    SEQLEN_BUCKET: tl.constexpr = 0,  # log2 of the longest sample: only an autotuning key
    WARP_SPECIALIZE: tl.constexpr = False,  # Hopper warp specialization: every load by TMA
    # with WARP_SPECIALIZE: extents for the TMA descriptors; LSE / DELTA are the preprocess's
    # aligned copies, sample b's rows starting at CU_ALIGNED[b]
    total_q=0, total_k=0, kv_width=0, lse_numel=0, CU_ALIGNED=None,
):  # fmt: skip
    m_block = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.load(ORDER + tl.program_id(2))
    q_start, len_q = _sample_bounds(CU_Q, b)
    if not WARP_SPECIALIZE:  # an early return before the specialized loop does not compile
        if m_block * BLOCK_M >= len_q:
            return
    k_start, len_k = _sample_bounds(CU_K, b)
    kv_h = h // group
    offset = len_k - len_q
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_mask = rows < len_q
    d_mask = d < head_dim
    q_mask = row_mask[:, None] & d_mask[None, :]
    k_src, v_src = K, V
    if WARP_SPECIALIZE:
        # Every tile by TMA (see the dK/dV kernel): q / dO zeroed past D (the next head's columns
        # would meet k's and v's in S and dP); k / v rows past the sample are masked probabilities.
        q_desc, do_desc, k_src, v_src, lse_desc, delta_desc = _bwd_descriptors(
            Q, K, V, DO, LSE, DELTA, stride_qt, stride_kt, stride_vt, stride_dot, group, total_q, total_k, kv_width,
            lse_numel, BLOCK_M, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        q0 = (q_start + m_block * BLOCK_M).to(tl.int32)
        q = tl.where(d_mask[None, :], q_desc.load([q0, (h * stride_qh).to(tl.int32)]), 0.0)
        do = tl.where(d_mask[None, :], do_desc.load([q0, (h * stride_doh).to(tl.int32)]), 0.0)
        aligned = tl.load(CU_ALIGNED + b).to(tl.int64)
        lse = lse_desc.load([(h * stride_lh + aligned + m_block * BLOCK_M).to(tl.int32)])
        delta = delta_desc.load([(h * stride_lh + aligned + m_block * BLOCK_M).to(tl.int32)])
    else:
        q = tl.load(Q + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + (q_start + rows)[:, None] * stride_dot + h * stride_doh + d[None, :], mask=q_mask,
                     other=0.0)  # fmt: skip
        lse = tl.load(LSE + h * stride_lh + q_start + rows, mask=row_mask, other=0.0)
        delta = tl.load(DELTA + h * stride_lh + q_start + rows, mask=row_mask, other=0.0)
    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # once, not per key block
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_end = len_k
    if CAUSAL:
        n_end = tl.maximum(tl.minimum(len_k, (m_block + 1) * BLOCK_M + offset), 0)
    if WARP_SPECIALIZE:  # empty query blocks run no key block
        n_end = tl.where(m_block * BLOCK_M >= len_q, 0, n_end)
    n_full = 0  # whole key blocks every row of the tile sees: no masks (as in the forward)
    if not WARP_SPECIALIZE:
        n_full = len_k // BLOCK_N * BLOCK_N
        if CAUSAL:
            n_full = tl.minimum(n_full, tl.maximum(m_block * BLOCK_M + offset + 1, 0) // BLOCK_N * BLOCK_N)
        for n0 in range(0, n_full, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            k, v = _kv_tiles(k_src, v_src, k_start, n0, kv_h, cols, len_k, d, d_mask,
                             stride_kt, stride_kh, stride_vt, stride_vh, False, False)  # fmt: skip
            dq = _dq_step(q, do, k, v, lse_log2, delta, dq, rows, cols, row_mask, len_k, offset, scale_log2,
                          False, CAUSAL, PRECISION)  # fmt: skip
    for n0 in tl.range(n_full, n_end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        cols = n0 + tl.arange(0, BLOCK_N)
        k, v = _kv_tiles(k_src, v_src, k_start, n0, kv_h, cols, len_k, d, d_mask,
                         stride_kt, stride_kh, stride_vt, stride_vh, WARP_SPECIALIZE, True)  # fmt: skip
        dq = _dq_step(q, do, k, v, lse_log2, delta, dq, rows, cols, row_mask, len_k, offset, scale_log2,
                      True, CAUSAL, PRECISION)  # fmt: skip
    tl.store(
        DQ + (q_start + rows)[:, None] * stride_dqt + h * stride_dqh + d[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=q_mask,
    )


# Forward tiles the autotuner may pick on a GPU: every one keeps wgmma and spills nothing at
# D = 64 and 128 in the sm_90 compile (tests/kernels/test_compile_sm90.py checks each).
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
    for m, n, w, st in ((128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3))
]
_FWD_KEY = ["BLOCK_D", "CAUSAL", "PRECISION", "SEQLEN_BUCKET", "USE_TMA", "WARP_SPECIALIZE"]


def _key(config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def _prune_wide_heads(allowed: set[tuple]):
    """An autotune pruner: at D <= 64 every config, above it only the ``allowed`` tiles (the
    others spill there in the sm_90 compile)."""

    def prune(configs, named_args, **kwargs):
        if named_args["BLOCK_D"] <= 64:
            return configs
        return [c for c in configs if _key(c) in allowed]

    return prune


# (64, 128, 4, 3) spills 40 B at D = 128 since the unmasked loop was split off
FWD_WIDE_HEAD_OK = {_key(c) for c in FWD_CONFIGS} - {(64, 128, 4, 3)}
_prune_fwd = _prune_wide_heads(FWD_WIDE_HEAD_OK)
attn_fwd_autotuned = triton.autotune(
    configs=FWD_CONFIGS, key=_FWD_KEY, prune_configs_by={"early_config_prune": _prune_fwd}
)(attn_fwd_kernel)
# Warp-specialized forward (warp_specialize=True): Triton specializes only at num_warps = 4 (at 8 the
# loop compiles unspecialized). These spill nothing at D = 64 and 128 and fit shared memory;
# 256-row tiles spill (40-1008 B) and 128 x 128 x 3 stages needs 262 KB at D = 128.
WS_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=st)
    for m, n, st in ((128, 64, 2), (128, 64, 3), (128, 128, 2))
]
attn_fwd_ws_autotuned = triton.autotune(configs=WS_FWD_CONFIGS, key=_FWD_KEY)(attn_fwd_kernel)


# Backward tiles the autotuner may pick on a GPU, from the sm_90 compile (registers / stack per
# thread, tests/kernels/test_compile_sm90.py checks each): every one issues wgmma. dK/dV is
# (queries per step BLOCK_M, keys per program BLOCK_N); at D = 128 only 128-key tiles with 16 or
# 32 queries per step spill nothing (32 x 64 spilled 224 B, 64 x 128 312 B), so the wider ones
# are offered at D <= 64 only. dQ is (queries per program, keys per step): none of these spill.
DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
    for m, n, w, st in (
        (32, 128, 8, 2),
        (16, 128, 8, 2),
        (32, 128, 8, 3),
        (64, 128, 8, 2),
        (32, 64, 4, 2),
        (32, 64, 4, 3),
    )  # fmt: skip
]
DKDV_WIDE_HEAD_OK = {(32, 128, 8, 2), (16, 128, 8, 2)}
DQ_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
    for m, n, w, st in (
        (128, 32, 8, 2),
        (128, 32, 8, 3),
        (128, 64, 8, 2),
        (64, 32, 4, 2),
        (64, 64, 4, 3),
        (128, 16, 8, 2),
    )  # fmt: skip
]


# Warp-specialized backward (warp_specialize=True): 4 warps, which the Hopper pass turns into 12.
# From the sm_90 compile: at D = 128 only these dK/dV tiles keep the stack within 8 B (64-query
# steps spill 192-320 B); every dQ tile below is spill-free at D = 64 and 128.
DKDV_WS_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=2)
    for m, n in ((32, 128), (16, 128), (32, 64), (64, 128), (64, 64))
]
DKDV_WS_WIDE_HEAD_OK = {(32, 128, 4, 2), (16, 128, 4, 2), (32, 64, 4, 2)}
DQ_WS_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=2)
    for m, n in ((128, 32), (128, 64), (64, 64), (128, 16), (64, 32))
]


_prune_dkdv = _prune_wide_heads(DKDV_WIDE_HEAD_OK)
_prune_dkdv_ws = _prune_wide_heads(DKDV_WS_WIDE_HEAD_OK)


_BWD_KEY = ["BLOCK_D", "CAUSAL", "PRECISION", "SEQLEN_BUCKET", "WARP_SPECIALIZE"]
attn_bwd_dkdv_autotuned = triton.autotune(
    configs=DKDV_CONFIGS, key=_BWD_KEY, prune_configs_by={"early_config_prune": _prune_dkdv}
)(attn_bwd_dkdv_kernel)
attn_bwd_dq_autotuned = triton.autotune(configs=DQ_CONFIGS, key=_BWD_KEY)(attn_bwd_dq_kernel)
attn_bwd_dkdv_ws_autotuned = triton.autotune(
    configs=DKDV_WS_CONFIGS, key=_BWD_KEY, prune_configs_by={"early_config_prune": _prune_dkdv_ws}
)(attn_bwd_dkdv_kernel)
attn_bwd_dq_ws_autotuned = triton.autotune(configs=DQ_WS_CONFIGS, key=_BWD_KEY)(attn_bwd_dq_kernel)


def _persistent_programs(device: torch.device, warp_specialized: bool = False) -> int:
    """Programs of the persistent grid: two per SM on a GPU (one resident per SM at these tiles,
    the second hides the tail), one when warp-specialized (12 warps x 168 registers fill an SM's
    register file: a second program would only queue behind the first); three under the
    interpreter, so programs loop over tiles."""
    if interpreting():
        return 3
    return (1 if warp_specialized else 2) * torch.cuda.get_device_properties(device).multi_processor_count


def _tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether TMA can read these (tokens, heads, D) tensors as 2-D (tokens, heads * D) boxes:
    each token's heads adjacent (strides (any, D, 1): contiguous tensors and views of a fused
    qkv projection alike), and the base, the token stride and every head's column offset
    (h * D elements) 16-byte aligned. A pure check: the launcher installs the allocator."""
    for t in tensors:
        size = t.element_size()
        heads_adjacent = t.stride(2) == 1 and (t.shape[1] == 1 or t.stride(1) == t.shape[2])
        if not heads_adjacent or t.data_ptr() % 16 or (t.stride(0) * size) % 16 or (t.shape[2] * size) % 16:
            return False
    return True


def use_tma(k: torch.Tensor, v: torch.Tensor, requested: bool = True) -> bool:
    """K / V by TMA when asked (``requested``: the ``attn_tma`` setting, off by default until an
    H100 run shows it pays) and the layout allows it (_tma_ready)."""
    return requested and _tma_ready(k, v)


def use_warp_specialization(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, requested: bool = True) -> bool:
    """Triton's Hopper warp specialization of the forward's key loop, when asked (``attn_ws``).

    Its producer partition issues only TMA copies (a masked load there does not compile), so
    q, k and v all go by TMA and must all be _tma_ready; otherwise the plain kernel runs. With
    num_warps = 4 the compiled kernel has 12 warps: one producer warpgroup (40 registers after
    setmaxnreg) feeding two consumer warpgroups (232) that each take 64 rows of the query tile.
    Off by default until an H100 run shows it pays.
    """
    return requested and _tma_ready(q, k, v)


def use_backward_warp_specialization(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, requested: bool = True) -> bool:
    """The same for the dK/dV and dQ kernels (``attn_bwd_ws``; their q, dO, k, v tiles and
    lse / delta vectors all by TMA; dO and lse are made contiguous). Off until measured."""
    return requested and _tma_ready(q, k, v)


def _tiles(head_dim: int, kernel: str) -> tuple[int, int, int, dict]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, launch options) per kernel. Small tiles under the interpreter.

    Chosen from the sm_90 compile (tests/kernels/test_compile_sm90.py reads registers, stack and
    the MMA instructions): tiles that keep wgmma with the least stack. dK/dV works on key tiles of
    128 rows (its matmuls are keys x queries; wgmma needs >= 64 rows per warpgroup) and 32-query
    steps: 24 B of stack at D = 128, none at 64; 128 x 32 spilled less but fell back to mma.sync.
    To be autotuned on a GPU.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreting():
        return 16, 16, block_d, {}
    small = block_d <= 64
    if kernel == "fwd_ws":  # 12 warps once specialized; 128 x 128 tiles also fit (WS_FWD_CONFIGS)
        return 128, 64, block_d, {"num_warps": 4, "num_stages": 2}
    if kernel == "fwd":
        return 128, 64, block_d, {"num_warps": 4, "num_stages": 3} if small else {"num_warps": 8, "num_stages": 2}
    if kernel == "dkdv":  # BLOCK_M: queries per step, BLOCK_N: keys per program
        return 32, 128, block_d, {"num_warps": 8, "num_stages": 2}
    if kernel == "dkdv_ws":  # the spill-free tiles of DKDV_WS_CONFIGS
        return 32 if small else 16, 128, block_d, {"num_warps": 4, "num_stages": 2}
    if kernel == "dq_ws":
        return 128, 32, block_d, {"num_warps": 4, "num_stages": 2}
    return 128, 32, block_d, {"num_warps": 8, "num_stages": 2}  # dq


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def longest_first(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """Sample indices by decreasing attention work (Lq * Lk), computed on the device (no sync).

    CUDA launches blocks in grid order, so putting the heaviest samples on the slowest grid axis
    starts one long video first and lets the short images fill in behind it instead of leaving
    it to run alone at the end.
    """
    work = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long() * (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    return torch.argsort(work, descending=True, stable=True).to(torch.int32)


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, causal, *,
                             autotune=True, persistent=False, tma=False, warp_specialize=False):  # fmt: skip
    """q (total_q, H, D), k/v (total_k, Hk, D) -> out (total_q, H, D), lse (H, total_q) fp32.

    ``autotune``: autotuned tiles (GPUs only; the interpreter always runs the fixed ones);
    ``persistent``, ``tma``, ``warp_specialize``: the opt-in variants of the module docstring."""
    total_q, heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    batch = cu_seqlens_q.shape[0] - 1
    if total_q == 0:
        return out, lse
    cu_seqlens_q, cu_seqlens_k = contiguous(cu_seqlens_q, cu_seqlens_k)
    ws = use_warp_specialization(q, k, v, warp_specialize)
    kv_tma = ws or use_tma(k, v, tma)
    if kv_tma:
        use_device_tma_descriptors()
    block_m, block_n, block_d, opts = _tiles(head_dim, "fwd_ws" if ws else "fwd")
    order = longest_first(cu_seqlens_q, cu_seqlens_k)
    args = (
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, order,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        heads // k.shape[1], head_dim, softmax_scale * LOG2E, k.shape[0], k.shape[1] * head_dim,
    )  # fmt: skip
    flags = dict(BLOCK_D=block_d, CAUSAL=causal, PRECISION=_precision(q.dtype),
                 SEQLEN_BUCKET=max(0, max_seqlen_q - 1).bit_length(), USE_TMA=kv_tma,
                 WARP_SPECIALIZE=ws, total_q=total_q)  # fmt: skip
    if persistent:
        # an upper bound of the tile count, known without reading cu_seqlens back
        tiles = triton.cdiv(max_seqlen_q, block_m) * heads * batch
        grid = (max(1, min(tiles, _persistent_programs(q.device, ws))),)
        flags.pop("SEQLEN_BUCKET")
        launcher(attn_fwd_persistent_kernel)[grid](
            *args, batch, heads, BLOCK_M=block_m, BLOCK_N=block_n, **flags, **opts
        )
    elif autotune and not interpreting():
        grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
        launcher(attn_fwd_ws_autotuned if ws else attn_fwd_autotuned)[grid](*args, **flags)
    else:
        grid = (triton.cdiv(max_seqlen_q, block_m), heads, batch)
        launcher(attn_fwd_kernel)[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, **flags, **opts)
    return out, lse


def varlen_attention_backward(
    dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, *,
    autotune=True, warp_specialize=False,
):  # fmt: skip
    """(dq, dk, dv) in the dtypes of q, k, v; ``autotune`` and ``warp_specialize`` as the forward's."""
    total_q, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if total_q == 0:
        return dq, dk.zero_(), dv.zero_()
    # lse dense: delta is allocated like it and both are read with lse's head stride
    cu_seqlens_q, cu_seqlens_k, lse = contiguous(cu_seqlens_q, cu_seqlens_k, lse)
    ws = use_backward_warp_specialization(q, k, v, warp_specialize)
    if ws:
        use_device_tma_descriptors()
    dout = dout.contiguous() if ws or dout.stride(-1) != 1 else dout  # TMA reads dO as (total_q, H * D)
    precision = _precision(q.dtype)
    block_d = max(16, triton.next_power_of_2(head_dim))
    pre_m = 16 if interpreting() else 64
    order = longest_first(cu_seqlens_q, cu_seqlens_k)
    extra = {}
    if ws:
        # TMA's 1-D lse / delta boxes must start 16-byte aligned: the preprocess writes delta and
        # a copy of lse with every sample starting at a multiple of ALIGN_ROWS (zeros between).
        lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
        padded = (lengths + ALIGN_ROWS - 1) // ALIGN_ROWS * ALIGN_ROWS
        cu_aligned = F.pad(torch.cumsum(padded, 0), (1, 0)).to(torch.int32)
        rows = triton.cdiv(total_q, ALIGN_ROWS) * ALIGN_ROWS + batch * ALIGN_ROWS  # a bound, no sync
        delta = torch.zeros((heads, rows), dtype=torch.float32, device=q.device)
        lse_aligned = torch.zeros_like(delta)
        extra = dict(LSE=lse, LSE_ALIGNED=lse_aligned, CU_ALIGNED=cu_aligned, stride_lh=lse.stride(0))
    else:
        delta = torch.empty_like(lse)
    launcher(attn_bwd_preprocess_kernel)[(triton.cdiv(max_seqlen_q, pre_m), heads, batch)](
        out, dout, delta, cu_seqlens_q, order,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
        head_dim, BLOCK_M=pre_m, BLOCK_D=block_d, **extra,
    )  # fmt: skip
    if ws:
        lse = lse_aligned
    common = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), lse.stride(0),
    )  # fmt: skip
    scale_args = (heads // kv_heads, head_dim, softmax_scale, softmax_scale * LOG2E)
    dkdv_args = (
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, order,
        *common, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *scale_args,
    )  # fmt: skip
    dq_args = (
        q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, order,
        *common, dq.stride(0), dq.stride(1), *scale_args,
    )  # fmt: skip
    flags = dict(BLOCK_D=block_d, CAUSAL=causal, PRECISION=precision,
                 SEQLEN_BUCKET=max(0, max(max_seqlen_q, max_seqlen_k) - 1).bit_length(), WARP_SPECIALIZE=ws,
                 total_q=total_q, total_k=k.shape[0], kv_width=kv_heads * head_dim, lse_numel=lse.numel(),
                 CU_ALIGNED=extra.get("CU_ALIGNED"))  # fmt: skip
    if autotune and not interpreting():
        dkdv_kernel = attn_bwd_dkdv_ws_autotuned if ws else attn_bwd_dkdv_autotuned
        grid = lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), kv_heads, batch)  # noqa: E731
        launcher(dkdv_kernel)[grid](*dkdv_args, **flags)
        dq_kernel = attn_bwd_dq_ws_autotuned if ws else attn_bwd_dq_autotuned
        grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
        launcher(dq_kernel)[grid](*dq_args, **flags)
    else:
        block_m, block_n, _, opts = _tiles(head_dim, "dkdv_ws" if ws else "dkdv")
        grid = (triton.cdiv(max_seqlen_k, block_n), kv_heads, batch)
        launcher(attn_bwd_dkdv_kernel)[grid](*dkdv_args, BLOCK_M=block_m, BLOCK_N=block_n, **flags,
                                                              **opts)  # fmt: skip
        block_m, block_n, _, opts = _tiles(head_dim, "dq_ws" if ws else "dq")
        grid = (triton.cdiv(max_seqlen_q, block_m), heads, batch)
        launcher(attn_bwd_dq_kernel)[grid](*dq_args, BLOCK_M=block_m, BLOCK_N=block_n, **flags,
                                                            **opts)  # fmt: skip
    return dq, dk, dv

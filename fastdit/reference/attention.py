"""Softmax attention, dense and variable-length (flash-attn's varlen contract), forward and backward.

float32 math (float64 for float64 inputs), queries processed in chunks so that the score matrix
stays bounded (the reference must also run at real video lengths, 30k-75k tokens). Causal masking
is aligned to the bottom right, as flash-attn >= 2.1 does: query i of a sample sees key j iff
``j <= i + Lk - Lq``; a query that sees no key outputs 0 and has lse = -inf. K/V may have fewer
heads than Q (GQA / MQA) when their head count divides Q's.
"""

import math

import torch

from fastdit.reference.common import dense_cu_seqlens, upcast

# Score-matrix budget per chunk, in float32 elements (512 MiB).
_CHUNK_ELEMS = 1 << 27


def _chunk_rows(heads: int, len_k: int) -> int:
    return max(1, _CHUNK_ELEMS // max(1, heads * len_k))


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(L, Hk, D) -> (L, H, D) by repeating each KV head for its group of query heads."""
    rep = heads // t.shape[1]
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


def _scores(q, k, scale, causal, row0, len_q, len_k):
    """Scaled scores (H, rows, Lk) of query rows [row0, row0 + rows) with the causal mask applied."""
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        rows = torch.arange(row0, row0 + q.shape[0], device=q.device)[:, None]
        cols = torch.arange(len_k, device=q.device)[None, :]
        s = s.masked_fill(cols > rows + (len_k - len_q), float("-inf"))
    return s


def _fwd_one(q, k, v, scale, causal):
    """One sample: q (Lq, H, D), k/v (Lk, H, D) float32 -> out (Lq, H, Dv), lse (H, Lq)."""
    len_q, heads, _ = q.shape
    len_k = k.shape[0]
    out = q.new_empty((len_q, heads, v.shape[-1]))
    lse = q.new_empty((heads, len_q))
    step = _chunk_rows(heads, len_k)
    for r0 in range(0, len_q, step):
        s = _scores(q[r0 : r0 + step], k, scale, causal, r0, len_q, len_k)
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows with no visible key
        p = torch.exp(s - m)
        denom = p.sum(dim=-1, keepdim=True)
        lse[:, r0 : r0 + step] = (m + torch.log(denom)).squeeze(-1)
        p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
        out[r0 : r0 + step] = torch.einsum("hqk,khd->qhd", p, v)
    return out, lse


def _bwd_one(dout, q, k, v, out, lse, scale, causal):
    """One sample's (dq, dk, dv) in float32, recomputing probabilities from lse."""
    len_q, heads, _ = q.shape
    len_k = k.shape[0]
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    delta = (dout * out).sum(-1).transpose(0, 1)  # (H, Lq)
    step = _chunk_rows(heads, len_k)
    for r0 in range(0, len_q, step):
        sl = slice(r0, r0 + step)
        s = _scores(q[sl], k, scale, causal, r0, len_q, len_k)
        row_lse = lse[:, sl, None]
        p = torch.where(torch.isinf(row_lse), torch.zeros_like(s), torch.exp(s - row_lse))
        do = dout[sl]
        dv += torch.einsum("hqk,qhd->khd", p, do)
        dp = torch.einsum("qhd,khd->hqk", do, v)
        ds = p * (dp - delta[:, sl, None])
        dq[sl] = torch.einsum("hqk,khd->qhd", ds, k) * scale
        dk += torch.einsum("hqk,qhd->khd", ds, q[sl]) * scale
    return dq, dk, dv


def _fold_kv_grad(g: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum the gradients of repeated KV heads back onto the (L, Hk, D) original."""
    length, heads, dim = g.shape
    return g if heads == kv_heads else g.view(length, kv_heads, heads // kv_heads, dim).sum(2)


def _default_scale(head_dim: int, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale


def _lengths(cu: torch.Tensor) -> list[int]:
    return cu.to("cpu", torch.int64).tolist()


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed attention: q (total_q, H, D), k/v (total_k, Hk, D) -> out (total_q, H, D) in q.dtype,

    lse (H, total_q) float32 (float64 for float64 inputs; natural log of each row's softmax denominator, scaled scores).
    """
    heads = q.shape[1]
    scale = _default_scale(q.shape[-1], softmax_scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    out = q.new_empty((q.shape[0], heads, v.shape[-1]), dtype=acc)
    lse = q.new_empty((heads, q.shape[0]), dtype=acc)
    cq, ck = _lengths(cu_seqlens_q), _lengths(cu_seqlens_k)
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        o, lse_b = _fwd_one(
            upcast(q[qs]), _expand_kv(upcast(k[ks]), heads), _expand_kv(upcast(v[ks]), heads), scale, causal
        )
        out[qs] = o
        lse[:, qs] = lse_b
    return out.to(q.dtype), lse


def varlen_attention_bwd_ref(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of varlen_attention_ref, in the dtypes of q, k, v."""
    heads, kv_heads = q.shape[1], k.shape[1]
    scale = _default_scale(q.shape[-1], softmax_scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    cq, ck = _lengths(cu_seqlens_q), _lengths(cu_seqlens_k)
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        dq_b, dk_b, dv_b = _bwd_one(
            upcast(dout[qs]),
            upcast(q[qs]),
            _expand_kv(upcast(k[ks]), heads),
            _expand_kv(upcast(v[ks]), heads),
            upcast(out[qs]),
            lse[:, qs],
            scale,
            causal,
        )
        dq[qs] = dq_b
        dk[ks] = _fold_kv_grad(dk_b, kv_heads)
        dv[ks] = _fold_kv_grad(dv_b, kv_heads)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float | None = None, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention: q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, D), lse (B, H, Sq).

    The varlen reference on B equal-length samples; lse is float32 (float64 for float64 inputs).
    """
    batch, len_q, heads, _ = q.shape
    len_k = k.shape[1]
    out, lse = varlen_attention_ref(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        dense_cu_seqlens(batch, len_q, q.device),
        dense_cu_seqlens(batch, len_k, q.device),
        softmax_scale=softmax_scale,
        causal=causal,
    )
    return out.view(q.shape), lse.view(heads, batch, len_q).transpose(0, 1).contiguous()


def attention_bwd_ref(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of attention_ref."""
    batch, len_q = q.shape[:2]
    len_k = k.shape[1]
    dq, dk, dv = varlen_attention_bwd_ref(
        dout.flatten(0, 1),
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        out.flatten(0, 1),
        lse.transpose(0, 1).flatten(1),
        dense_cu_seqlens(batch, len_q, q.device),
        dense_cu_seqlens(batch, len_k, q.device),
        softmax_scale=softmax_scale,
        causal=causal,
    )
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)

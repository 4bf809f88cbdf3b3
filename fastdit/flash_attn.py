"""flash-attn 2.x's functional API on fastdit's attention: code written against ``flash_attn``
runs unchanged with ``from fastdit import flash_attn`` (or ``import fastdit.flash_attn as
flash_attn``) in place of the package.

Same signatures (positional order, defaults, keywords) and return forms as flash-attn 2.x:

- dense: q ``(B, Sq, H, D)``, k / v ``(B, Sk, Hk, D)``; varlen: q ``(total_q, H, D)``, k / v
  ``(total_k, Hk, D)`` with ``cu_seqlens`` ``(B+1,)`` int32 or int64; ``Hk`` divides ``H``
  (GQA / MQA); ``causal`` aligned bottom-right when Sq != Sk, as flash-attn >= 2.1.
- ``return_attn_probs=True`` gives ``(out, softmax_lse, None)``: the LSE float32 ``(B, H, Sq)``
  dense, ``(H, total_q)`` varlen, as flash-attn; the third slot (flash-attn's dropout mask, only
  meaningful with dropout) is None.
- zero-length samples in ``cu_seqlens`` are allowed, as in flash-attn: a query sample with no key
  gives out 0 and LSE -inf.
- refused by name (:class:`fastdit.ops.dispatch.BackendNotSupportedError`): ``dropout_p > 0``,
  ``window_size`` other than ``(-1, -1)``, ``softcap != 0``, ``alibi_slopes``, ``block_table``
  (paged KV). ``deterministic`` is accepted: fastdit's backward kernels use no atomics.
- ``apply_rotary_emb``: flash-attn's rotary contract, dense and varlen, in plain PyTorch (not
  yet the fused RoPE op).

Gradients flow to q, k and v (not through the LSE). The fastdit backend is the dispatcher's
choice; ``backend=`` (keyword, fastdit's own) forces one.
"""

import itertools

import torch

from fastdit import ops
from fastdit.ops.dispatch import BackendNotSupportedError

__all__ = [
    "apply_rotary_emb",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]


def _refuse_unserved(dropout_p, window_size, softcap, alibi_slopes, block_table=None) -> None:
    if dropout_p:
        raise BackendNotSupportedError(f"fastdit.flash_attn: dropout_p={dropout_p} is not served (inference kernels)")
    if tuple(window_size) != (-1, -1):
        raise BackendNotSupportedError(f"fastdit.flash_attn: window_size={tuple(window_size)} (local attention) "
                                       "is not served; pass (-1, -1)")  # fmt: skip
    if softcap:
        raise BackendNotSupportedError(f"fastdit.flash_attn: softcap={softcap} is not served")
    if alibi_slopes is not None:
        raise BackendNotSupportedError("fastdit.flash_attn: alibi_slopes are not served")
    if block_table is not None:
        raise BackendNotSupportedError("fastdit.flash_attn: block_table (paged KV cache) is not served")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, backend=None):  # fmt: skip
    """Dense attention: q ``(B, Sq, H, D)``, k / v ``(B, Sk, Hk, D)`` -> ``(B, Sq, H, D)``; with
    ``return_attn_probs``, ``(out, softmax_lse (B, H, Sq) float32, None)``."""
    _refuse_unserved(dropout_p, window_size, softcap, alibi_slopes)
    out, lse = ops.attention(q, k, v, softmax_scale=softmax_scale, causal=causal, return_lse=True, backend=backend)
    return (out, lse.float(), None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              backend=None):  # fmt: skip
    """``qkv`` ``(B, S, 3, H, D)``; otherwise as :func:`flash_attn_func`."""
    _check_packed("qkv", qkv, 5, 3)
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs, backend=backend)  # fmt: skip


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             backend=None):  # fmt: skip
    """``kv`` ``(B, Sk, 2, Hk, D)``; otherwise as :func:`flash_attn_func`."""
    _check_packed("kv", kv, 5, 2)
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs, backend=backend)  # fmt: skip


def _check_packed(name, t, ndim, slots) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != ndim or t.shape[-3] != slots:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"fastdit.flash_attn: {name} must be a {ndim}-D tensor with {slots} at dim -3, got {shape}")


def _cu_list(name, cu, total) -> list[int]:
    """``cu_seqlens`` read on the host (int32 or int64, as flash-attn takes), checked."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"fastdit.flash_attn: {name} must be a 1-D int32 or int64 tensor, got {got}")
    values = cu.tolist()
    if len(values) < 2 or values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"fastdit.flash_attn: {name} must start at 0, never decrease and end at {total} "
                         f"(the packed length), got {values[:8]}{' ...' if len(values) > 8 else ''}")  # fmt: skip
    return values


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *,
                           backend=None):  # fmt: skip
    """Packed attention: q ``(total_q, H, D)``, k / v ``(total_k, Hk, D)``, each sample attending
    to its own keys -> ``(total_q, H, D)``; with ``return_attn_probs``, ``(out, softmax_lse
    (H, total_q) float32, None)``. Zero-length samples are allowed."""
    _refuse_unserved(dropout_p, window_size, softcap, alibi_slopes, block_table)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"fastdit.flash_attn: {name} must be (total, H, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")  # fmt: skip
    cu_q, cu_k = _cu_list("cu_seqlens_q", cu_seqlens_q, q.shape[0]), _cu_list("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if len(cu_q) != len(cu_k):
        raise ValueError(f"fastdit.flash_attn: cu_seqlens_q and cu_seqlens_k describe {len(cu_q) - 1} and "
                         f"{len(cu_k) - 1} samples")  # fmt: skip
    len_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    len_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
    if max(len_q) > max_seqlen_q or max(len_k) > max_seqlen_k:
        raise ValueError(f"fastdit.flash_attn: max_seqlen_q={max_seqlen_q} / max_seqlen_k={max_seqlen_k} are below "
                         f"the longest samples ({max(len_q)}, {max(len_k)})")  # fmt: skip
    live = [i for i in range(len(len_q)) if len_q[i] and len_k[i]]
    heads = q.shape[1]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if len(live) == len(len_q):  # no empty sample: the packed call as given
        device_cu = [torch.tensor(c, dtype=torch.int32, device=q.device) for c in (cu_q, cu_k)]
        out, lse = ops.varlen_attention(q, k, v, *device_cu, max(len_q), max(len_k), softmax_scale=softmax_scale,
                                        causal=causal, return_lse=True, backend=backend)  # fmt: skip
        return (out, lse.to(lse_dtype), None) if return_attn_probs else out
    out = q.new_zeros(q.shape[0], heads, v.shape[-1])
    lse = q.new_full((heads, q.shape[0]), float("-inf"), dtype=lse_dtype)
    if live:  # the samples with queries and keys, packed; the others keep out 0 and lse -inf
        rows_q = torch.cat([torch.arange(cu_q[i], cu_q[i + 1], device=q.device) for i in live])
        rows_k = torch.cat([torch.arange(cu_k[i], cu_k[i + 1], device=q.device) for i in live])
        live_q, live_k = [len_q[i] for i in live], [len_k[i] for i in live]
        device_cu = [torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device=q.device)
                     for n in (live_q, live_k)]  # fmt: skip
        packed, packed_lse = ops.varlen_attention(q[rows_q], k[rows_k], v[rows_k], *device_cu, max(live_q),
                                                  max(live_k), softmax_scale=softmax_scale, causal=causal,
                                                  return_lse=True, backend=backend)  # fmt: skip
        out = out.index_copy(0, rows_q, packed)
        lse = lse.index_copy(1, rows_q, packed_lse.to(lse_dtype))
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, backend=None):  # fmt: skip
    """``qkv`` ``(total, 3, H, D)``; otherwise as :func:`flash_attn_varlen_func`."""
    _check_packed("qkv", qkv, 4, 3)
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, backend=backend)  # fmt: skip


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    backend=None):  # fmt: skip
    """``kv`` ``(total_k, 2, Hk, D)``; otherwise as :func:`flash_attn_varlen_func`."""
    _check_packed("kv", kv, 4, 2)
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, backend=backend)  # fmt: skip


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):  # fmt: skip
    """flash-attn's ``flash_attn.layers.rotary.apply_rotary_emb``: x ``(B, S, H, D)`` (or, with
    ``cu_seqlens`` ``(B+1,)`` and ``max_seqlen``, packed ``(total, H, D)``, positions restarting
    at each sample), cos / sin ``(S_ro, rotary_dim / 2)``; the first ``rotary_dim`` features of
    each head rotate, pairs interleaved ``(x0, x1), (x2, x3), ...`` or half-split
    ``(x_i, x_{i + rotary_dim/2})``; the rest pass through. ``seqlen_offsets`` (an int or a
    ``(B,)`` tensor) shifts each sample's positions; ``inplace=True`` writes into ``x``."""
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(f"fastdit.flash_attn.apply_rotary_emb: cos / sin must be (S_ro, rotary_dim / 2) alike, got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")  # fmt: skip
    offsets = torch.as_tensor(seqlen_offsets, device=x.device).reshape(-1)
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(f"fastdit.flash_attn.apply_rotary_emb: x must be (B, S, H, D), got {tuple(x.shape)}")
        positions = torch.arange(x.shape[1], device=x.device)[None, :] + offsets[:, None]  # (1 or B, S)
        positions = positions[:, :, None]  # against (B, S, H, R/2)
    else:
        if x.dim() != 3:
            raise ValueError(f"fastdit.flash_attn.apply_rotary_emb: with cu_seqlens x must be (total, H, D), got "
                             f"{tuple(x.shape)}")  # fmt: skip
        cu = _cu_list("cu_seqlens", cu_seqlens, x.shape[0])
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        if max_seqlen is not None and max(lengths) > max_seqlen:
            raise ValueError(f"fastdit.flash_attn.apply_rotary_emb: max_seqlen={max_seqlen} is below the longest "
                             f"sample ({max(lengths)})")  # fmt: skip
        if offsets.numel() not in (1, len(lengths)):
            raise ValueError(f"fastdit.flash_attn.apply_rotary_emb: seqlen_offsets must be an int or hold one offset "
                             f"per sample ({len(lengths)}), got {offsets.numel()}")  # fmt: skip
        sample = torch.repeat_interleave(torch.arange(len(lengths), device=x.device),
                                         torch.tensor(lengths, device=x.device))  # fmt: skip
        starts = torch.tensor(cu[:-1], device=x.device)[sample]
        positions = torch.arange(x.shape[0], device=x.device) - starts + offsets.expand(len(lengths))[sample]
        positions = positions[:, None]  # against (total, H, R/2)
    half = cos.shape[1]
    if 2 * half > x.shape[-1]:
        raise ValueError(f"fastdit.flash_attn.apply_rotary_emb: rotary_dim {2 * half} > head dim {x.shape[-1]}")
    if positions.numel() and (int(positions.max()) >= cos.shape[0] or int(positions.min()) < 0):
        raise ValueError(f"fastdit.flash_attn.apply_rotary_emb: positions span {int(positions.min())} to "
                         f"{int(positions.max())}, cos / sin have {cos.shape[0]} rows")  # fmt: skip
    # Tables gathered per position (cos / sin get no gradient, as in flash-attn), rotated by the
    # fused rotary op: features past rotary_dim pass through.
    rows = positions[..., 0] if cu_seqlens is None else positions[:, 0]  # (1 or B, S), or (total,)
    if cu_seqlens is None and rows.shape[0] == 1:
        rows = rows[0]  # one table of S rows, shared by every sample
    c, s = cos.detach()[rows.reshape(-1)], sin.detach()[rows.reshape(-1)]
    out = ops.rotary(x, c, s, interleaved=bool(interleaved))
    if inplace:
        return x.copy_(out)
    return out

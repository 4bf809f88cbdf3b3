"""Softmax attention: ``varlen_attention`` (flash-attn's varlen contract) and dense ``attention``."""

import math

import torch

from fastdit.kernels.launch import triton_missing
from fastdit.ops._common import last_dim_contiguous
from fastdit.ops._registry import (
    interpreter_fake,
    register_torch_backend,
    register_triton_backend,
    signature,
    typed,
)
from fastdit.ops.dispatch import Backend, choose, register_backend
from fastdit.ops.validation import FLOAT_DTYPES, check_cu_seqlens, check_max_seqlen, check_same_dtype, check_tensor
from fastdit.reference.attention import attention_bwd_ref, attention_ref, varlen_attention_bwd_ref, varlen_attention_ref
from fastdit.reference.common import dense_cu_seqlens

# ---- the custom ops' signatures, written once -------------------------------------------------

_T = torch.Tensor
_VARLEN = [("q", _T), ("k", _T), ("v", _T), ("cu_seqlens_q", _T), ("cu_seqlens_k", _T), ("max_seqlen_q", int),
           ("max_seqlen_k", int), ("softmax_scale", float), ("causal", bool)]  # fmt: skip
# The backward takes the forward's output and LSE, in the public varlen_attention_backward's order.
_VARLEN_BACKWARD = [("dout", _T), ("q", _T), ("k", _T), ("v", _T), ("out", _T), ("lse", _T), *_VARLEN[3:]]
# The triton kernels' variant flags (kernels/attention.py), each with its default; the forward op
# takes all five, so its autograd backward runs the forward's choice.
_TRITON_VARIANT = [("autotune", bool, True), ("persistent", bool, False), ("tma", bool, False), ("ws", bool, False),
                   ("bwd_ws", bool, False)]  # fmt: skip
_PAIR, _TRIPLE = tuple[_T, _T], tuple[_T, _T, _T]
# The dense ops' signatures (the reference's and torch's ops declare them inline; the vendor
# providers in attention_providers.py register theirs from these).
_DENSE = [("q", _T), ("k", _T), ("v", _T), ("softmax_scale", float), ("causal", bool)]
_DENSE_BACKWARD = [("dout", _T), ("q", _T), ("k", _T), ("v", _T), ("out", _T), ("lse", _T), *_DENSE[3:]]


def _triton_variant(values) -> dict:
    """The triton backend's variant from the settings (the names of _TRITON_VARIANT)."""
    return {
        "autotune": values.attn_autotune,
        "persistent": values.attn_persistent,
        "tma": values.attn_tma,
        "ws": values.attn_ws,
        "bwd_ws": values.attn_bwd_ws,
    }


def _fake_varlen(q, k, v, *args):
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    return q.new_empty((*q.shape[:2], v.shape[-1])), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)


def _fake_backward(dout, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_varlen(ctx, inputs, output):
    """Every backend's forward inputs (_VARLEN, then the triton op's variant flags)."""
    q, k, v, cu_q, cu_k, *ctx.args = inputs[:9]
    ctx.variant = dict(zip((name for name, *_ in _TRITON_VARIANT), inputs[9:]))
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)


def _backward_varlen_with(backward_form):
    """The autograd backward of a varlen forward op: ``backward_form`` of the same backend, with
    the forward's variant."""

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = backward_form(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.args, **ctx.variant)
        return dq, dk, dv, *([None] * (6 + len(ctx.variant)))

    return backward


# ---- reference backend -----------------------------------------------------------------------------


def _varlen_ref(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
    return varlen_attention_ref(q, k, v, cu_q, cu_k, softmax_scale=softmax_scale, causal=causal)


def _varlen_bwd_ref(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
    return varlen_attention_bwd_ref(dout, q, k, v, out, lse, cu_q, cu_k, softmax_scale=softmax_scale, causal=causal)


varlen_attention_reference = torch.library.custom_op(
    "fastdit::varlen_attention_reference", typed(_varlen_ref, signature(_VARLEN, _PAIR)), mutates_args=()
)
# The backward is an op of its own (as flash-attn's): its per-sample loop reads lengths on the
# host, so AOTAutograd must see it as one opaque node rather than trace into it.
varlen_attention_backward_reference = torch.library.custom_op(
    "fastdit::varlen_attention_backward_reference",
    typed(_varlen_bwd_ref, signature(_VARLEN_BACKWARD, _TRIPLE)),
    mutates_args=(),
)
varlen_attention_reference.register_fake(_fake_varlen)
varlen_attention_backward_reference.register_fake(_fake_backward)
varlen_attention_reference.register_autograd(
    _backward_varlen_with(varlen_attention_backward_reference), setup_context=_setup_varlen
)


@torch.library.custom_op("fastdit::attention_reference", mutates_args=())
def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_ref(q, k, v, softmax_scale=softmax_scale, causal=causal)


def _fake_dense(q, k, v, softmax_scale, causal):
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    batch, seqlen, heads, _ = q.shape
    return q.new_empty((batch, seqlen, heads, v.shape[-1])), q.new_empty((batch, heads, seqlen), dtype=lse_dtype)


attention_reference.register_fake(_fake_dense)


def _setup_dense(ctx, inputs, output):
    q, k, v, ctx.scale, ctx.causal = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)


@torch.library.custom_op("fastdit::attention_backward_reference", mutates_args=())
def attention_backward_reference(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd_ref(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal)


attention_backward_reference.register_fake(_fake_backward)


def _backward_dense_with(backward_op):
    """The autograd backward of a dense forward op: ``backward_op`` of the same backend."""

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, ctx.scale, ctx.causal)
        return dq, dk, dv, None, None

    return backward


attention_reference.register_autograd(_backward_dense_with(attention_backward_reference), setup_context=_setup_dense)

register_backend(
    Backend(
        "varlen_attention",
        "reference",
        varlen_attention_reference,
        devices=None,
        dtypes=FLOAT_DTYPES,
        backward=varlen_attention_backward_reference,
    )
)
register_backend(Backend("attention", "reference", attention_reference, devices=None, dtypes=FLOAT_DTYPES))


# ---- torch backend: PyTorch's CPU flash attention, sample by sample ------------------------------
# torch's SDPA on CPU runs aten::_scaled_dot_product_flash_attention_for_cpu, which also returns
# the log-sum-exp (F.scaled_dot_product_attention drops it), and its backward takes (out, lse):
# called directly, the op keeps its contract (lse, and a backward that a ring attention can feed a
# global lse). Causal masks are bottom-right aligned as in the reference: equal lengths use the
# kernel's own mask; with Lq > Lk the first Lq - Lk queries see no key (output 0, lse -inf) and
# the rest are the square case; with Lq < Lk an explicit boolean mask. CPU only: the GPU vendor
# providers (cuDNN / FlashAttention through SDPA, flash-attn, xformers) are registered apart.


def _sdpa_plan(len_q: int, len_k: int, causal: bool, like: torch.Tensor) -> tuple[int, bool, torch.Tensor | None]:
    """(query rows to skip, the kernel's is_causal, an explicit mask or None) for one sample; the
    mask is additive (0 / -inf) in ``like``'s dtype, the only kind the CPU kernel takes."""
    if not causal or len_q == len_k:
        return 0, causal, None
    if len_q > len_k:
        return len_q - len_k, True, None
    rows = torch.arange(len_q, device=like.device)[:, None]
    hidden = torch.arange(len_k, device=like.device)[None, :] > rows + (len_k - len_q)
    return 0, False, like.new_zeros((len_q, len_k)).masked_fill_(hidden, float("-inf"))


def expand_heads(t: torch.Tensor, heads: int, dim: int = 2) -> torch.Tensor:
    """K / V with each of its heads (axis ``dim``) repeated for its group of query heads (GQA / MQA)."""
    return t if t.shape[dim] == heads else t.repeat_interleave(heads // t.shape[dim], dim=dim)


def fold_heads(grad: torch.Tensor, kv_heads: int, dim: int = 2) -> torch.Tensor:
    """The gradient of :func:`expand_heads`: each group's heads summed back onto its K / V head."""
    if grad.shape[dim] == kv_heads:
        return grad
    return grad.unflatten(dim, (kv_heads, grad.shape[dim] // kv_heads)).sum(dim + 1)


def per_sample(dense_forward):
    """A varlen forward ``(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal)`` as one call of
    ``dense_forward(q, k, v, scale, causal)`` per sample (the host reads ``cu_seqlens``); one
    sample runs without copies in or out."""

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
        bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
        if len(bounds_q) == 2:
            out, lse = dense_forward(q[None], k[None], v[None], scale, causal)
            return out[0], lse[0]
        out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.promote_types(q.dtype, torch.float32))
        for b in range(len(bounds_q) - 1):
            rows, keys = slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1])
            out_b, lse_b = dense_forward(q[None, rows], k[None, keys], v[None, keys], scale, causal)
            out[rows], lse[:, rows] = out_b[0], lse_b[0]
        return out, lse

    return forward


def per_sample_backward(dense_backward):
    """The backward of :func:`per_sample`'s forward, from ``dense_backward(dout, q, k, v, out, lse,
    scale, causal)`` per sample."""

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal):
        bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for b in range(len(bounds_q) - 1):
            rows, keys = slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1])
            grads = dense_backward(dout[None, rows], q[None, rows], k[None, keys], v[None, keys], out[None, rows],
                                   lse[None, :, rows], scale, causal)  # fmt: skip
            dq[rows], dk[keys], dv[keys] = (g[0] for g in grads)
        return dq, dk, dv

    return backward


def _sdpa_forward(q, k, v, scale, causal):
    """q (B, Lq, H, D), k / v (B, Lk, Hk, D) -> out (B, Lq, H, D), lse (B, H, Lq) in float32 (float64 kept)."""
    # The kernel reads rows of D contiguous elements: a strided last dim gave wrong results (torch 2.13).
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    batch, len_q, heads, _ = q.shape
    skip, is_causal, mask = _sdpa_plan(len_q, k.shape[1], causal, q)
    k, v = expand_heads(k, heads), expand_heads(v, heads)
    if skip == 0:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, is_causal, attn_mask=mask, scale=scale
        )
        return _nan_query_rows(q, out.transpose(1, 2), lse)
    out = q.new_zeros((batch, len_q, heads, v.shape[-1]))
    lse = q.new_full((batch, heads, len_q), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32))
    if skip < len_q:
        seen, seen_lse = _sdpa_forward(q[:, skip:], k, v, scale, causal)
        out[:, skip:], lse[:, :, skip:] = seen, seen_lse
    return out, lse


def _nan_query_rows(q, out, lse):
    """NaN for the rows whose query holds a NaN, as in the reference: torch's CPU kernel (2.13)
    returns them finite (its running max skips NaN scores), a wrong result without an error."""
    bad = q.isnan().any(-1)  # (B, L, H)
    if bad.any():
        out = out.masked_fill(bad[..., None], float("nan"))
        lse = lse.masked_fill(bad.transpose(1, 2), float("nan"))
    return out, lse


def _sdpa_backward(dout, q, k, v, out, lse, scale, causal):
    """(dq, dk, dv) of :func:`_sdpa_forward` given its out and lse (layouts as there)."""
    dout, q, k, v, out = (last_dim_contiguous(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    batch, len_q, heads, _ = q.shape
    kv_heads = k.shape[2]
    skip, is_causal, mask = _sdpa_plan(len_q, k.shape[1], causal, q)
    dq = torch.zeros_like(q)
    dk = k.new_zeros((*k.shape[:2], heads, k.shape[-1]))
    dv = v.new_zeros((*v.shape[:2], heads, v.shape[-1]))
    if skip < len_q:
        rows = slice(skip, len_q)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *(t[:, rows].transpose(1, 2) for t in (dout, q)),
            *(expand_heads(t, heads).transpose(1, 2) for t in (k, v)),
            out[:, rows].transpose(1, 2),
            lse[:, :, rows].contiguous(),
            0.0,
            is_causal,
            attn_mask=mask,
            scale=scale,
        )
        dq[:, rows] = grads[0].transpose(1, 2)
        dk, dv = grads[1].transpose(1, 2), grads[2].transpose(1, 2)
    dk, dv = fold_heads(dk, kv_heads), fold_heads(dv, kv_heads)  # the repeated heads' gradients, summed
    return dq, dk.to(k.dtype), dv.to(v.dtype)


_varlen_torch = per_sample(_sdpa_forward)
_varlen_bwd_torch = per_sample_backward(_sdpa_backward)


def _contiguous(impl):
    """``impl`` with contiguous outputs: a custom op's outputs have the strides of its fake."""
    return lambda *args: tuple(t.contiguous() for t in impl(*args))


varlen_attention_torch = torch.library.custom_op(
    "fastdit::varlen_attention_torch", typed(_contiguous(_varlen_torch), signature(_VARLEN, _PAIR)), mutates_args=()
)
varlen_attention_backward_torch = torch.library.custom_op(
    "fastdit::varlen_attention_backward_torch", typed(_varlen_bwd_torch, signature(_VARLEN_BACKWARD, _TRIPLE)),
    mutates_args=(),
)  # fmt: skip
varlen_attention_torch.register_fake(_fake_varlen)
varlen_attention_backward_torch.register_fake(_fake_backward)
varlen_attention_torch.register_autograd(
    _backward_varlen_with(varlen_attention_backward_torch), setup_context=_setup_varlen
)


@torch.library.custom_op("fastdit::attention_torch", mutates_args=())
def attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _sdpa_forward(q, k, v, softmax_scale, causal)
    return out.contiguous(), lse.contiguous()


@torch.library.custom_op("fastdit::attention_backward_torch", mutates_args=())
def attention_backward_torch(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _sdpa_backward(dout, q, k, v, out, lse, softmax_scale, causal)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


attention_torch.register_fake(_fake_dense)
attention_backward_torch.register_fake(_fake_backward)
attention_torch.register_autograd(_backward_dense_with(attention_backward_torch), setup_context=_setup_dense)


def _unless_tracked(op, impl):
    """``op`` (the custom op: autograd, one opaque node for torch.compile) when gradients or a
    trace need it, else its implementation called directly: the same math, without the ~20 us of
    the custom-op machinery per call that a small inference step pays on a CPU, and without
    copying the outputs to contiguous (out in the kernel's (B, H, L, D) order, as SDPA returns it)."""

    def run(*args):
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return op(*args)
        return impl(*args)

    return run


def _dense_torch(q, k, v, softmax_scale, causal):
    return _sdpa_forward(q, k, v, softmax_scale, causal)


register_torch_backend("varlen_attention", _unless_tracked(varlen_attention_torch, _varlen_torch), devices=("cpu",),
                       backward=varlen_attention_backward_torch)  # fmt: skip
register_torch_backend("attention", _unless_tracked(attention_torch, _dense_torch), devices=("cpu",))

# ---- triton backend: kernels/attention.py ----------------------------------------------------------

ATTENTION_TRITON_MAX_HEAD_DIM = 256


def _triton_check(inputs: dict) -> list[str]:
    head_dim = inputs["head_dim"]
    if head_dim > ATTENTION_TRITON_MAX_HEAD_DIM:
        return [f"head_dim {head_dim} > {ATTENTION_TRITON_MAX_HEAD_DIM}"]
    return []


if triton_missing() is None:
    from fastdit.kernels.attention import varlen_attention_backward as varlen_backward_kernel
    from fastdit.kernels.attention import varlen_attention_forward

    def _varlen_triton(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, autotune, persistent, tma, ws,
                       bwd_ws):  # fmt: skip
        q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
        variant = dict(autotune=autotune, persistent=persistent, tma=tma, warp_specialize=ws)
        return varlen_attention_forward(q, k, v, cu_q, cu_k, max_q, softmax_scale, causal, **variant)

    def _varlen_bwd_triton(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, softmax_scale, causal, autotune,
                           persistent, tma, ws, bwd_ws):  # fmt: skip
        """Only autotune and bwd_ws concern the backward kernels."""
        q, k, v, out, lse = (last_dim_contiguous(t) for t in (q, k, v, out, lse))
        return varlen_backward_kernel(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, softmax_scale, causal,
                                      autotune=autotune, warp_specialize=bwd_ws)  # fmt: skip

    varlen_attention_triton = torch.library.triton_op(
        "fastdit::varlen_attention_triton",
        typed(_varlen_triton, signature([*_VARLEN, *_TRITON_VARIANT], _PAIR)),
        mutates_args=(),
    )
    varlen_attention_backward_triton = torch.library.triton_op(
        "fastdit::varlen_attention_backward_triton",
        typed(_varlen_bwd_triton, signature([*_VARLEN_BACKWARD, *_TRITON_VARIANT], _TRIPLE)),
        mutates_args=(),
    )
    interpreter_fake(varlen_attention_triton, lambda q, k, v, *args: (
        torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)))  # fmt: skip
    interpreter_fake(varlen_attention_backward_triton, _fake_backward)
    varlen_attention_triton.register_autograd(
        _backward_varlen_with(varlen_attention_backward_triton), setup_context=_setup_varlen
    )

    def _dense_attention_triton(q, k, v, softmax_scale, causal, **variant):
        """Dense (B, S, H, D) attention as the varlen kernel on B equal-length samples."""
        batch, len_q, heads, _ = q.shape
        len_k = k.shape[1]
        out, lse = varlen_attention_triton(
            q.reshape(batch * len_q, *q.shape[2:]),
            k.reshape(batch * len_k, *k.shape[2:]),
            v.reshape(batch * len_k, *v.shape[2:]),
            dense_cu_seqlens(batch, len_q, q.device),
            dense_cu_seqlens(batch, len_k, q.device),
            len_q,
            len_k,
            softmax_scale,
            causal,
            **variant,
        )
        return out.view(q.shape), lse.view(heads, batch, len_q).transpose(0, 1)

    register_triton_backend(
        "varlen_attention",
        varlen_attention_triton,
        check=_triton_check,
        backward=varlen_attention_backward_triton,
        variant=_triton_variant,
    )
    register_triton_backend("attention", _dense_attention_triton, check=_triton_check, variant=_triton_variant)
else:
    register_triton_backend("varlen_attention", None)
    register_triton_backend("attention", None)


# ---- public API -------------------------------------------------------------------------------------


def _check_qkv(q, k, v, ndim):
    check_tensor("q", q, ndims=(ndim,))
    check_tensor("k", k, ndims=(ndim,), device=q.device)
    check_tensor("v", v, ndims=(ndim,), device=q.device)
    check_same_dtype(("q", "k", "v"), (q, k, v))
    heads, head_dim = q.shape[-2:]
    kv_heads = k.shape[-2]
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got q of shape {tuple(q.shape)}")
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise ValueError(f"q, k, v must share head_dim {head_dim}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)} except in head_dim")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"k/v head count {kv_heads} must divide q's head count {heads} (GQA/MQA)")


def _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """The sample boundaries of packed q and k, forward and backward alike: a bad cu_seqlens
    would send the kernels outside the tensors."""
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, min_len=1)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, min_len=1)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} "
            "must describe the same number of samples"
        )
    check_max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q)
    check_max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k)


def seq_bucket(length: int) -> int:
    """The sequence-length bucket a measured policy is keyed on: the power of two >= ``length``."""
    return 1 << max(int(length) - 1, 0).bit_length()


def _inputs(q: torch.Tensor, causal: bool, square: bool, longest: int, varlen: bool = False) -> dict:
    """What the dispatcher sees of an attention call (forward and backward alike): ``square``
    says every sample's query and key lengths are equal (a causal mask is then the same aligned
    top-left or bottom-right), ``longest`` the longest query sample, bucketed for the policy; a
    varlen call also says whether a CUDA graph is being captured (providers that read
    ``cu_seqlens`` on the host cannot serve it)."""
    inputs = {"device": q.device, "dtype": q.dtype, "head_dim": q.shape[-1], "causal": bool(causal),
              "square": bool(square), "seq_bucket": seq_bucket(longest)}  # fmt: skip
    if varlen:
        inputs["capturing"] = q.is_cuda and torch.cuda.is_current_stream_capturing()
    return inputs


def _scale(softmax_scale, head_dim):
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    return float(softmax_scale)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed samples, each query sample attending only to its own keys.

    The contract of ``flash_attn_varlen_func``: self-attention when ``cu_seqlens_q`` equals
    ``cu_seqlens_k``, cross-attention (video tokens to their own text tokens) otherwise.

    Args:
        q: ``(total_q, H, D)``; fp16 / bf16 / fp32 / fp64.
        k, v: ``(total_k, Hk, D)``, same dtype; ``Hk`` divides ``H`` (GQA / MQA).
        cu_seqlens_q, cu_seqlens_k: ``(B+1,)`` int32 sample boundaries; every sample length >= 1.
        max_seqlen_q, max_seqlen_k: Python ints >= the longest query / key sample.
        softmax_scale: default ``1 / sqrt(D)``.
        causal: mask aligned to the bottom right (query i sees key j iff ``j <= i + Lk - Lq``).
        return_lse: also return the log-sum-exp of each row, ``(H, total_q)`` float32.
        backend: force a backend; default the dispatcher's choice.

    Returns:
        ``out (total_q, H, D)`` in ``q.dtype``, or ``(out, lse)`` with ``return_lse=True``.
    """
    _check_qkv(q, k, v, ndim=3)
    _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = _scale(softmax_scale, q.shape[-1])
    inputs = _inputs(q, causal, cu_seqlens_q is cu_seqlens_k, max_seqlen_q, varlen=True)
    impl = choose("varlen_attention", inputs, backend)
    out, lse = impl.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(causal))
    return (out, lse) if return_lse else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dense batched attention in the ``(B, S, H, D)`` layout (flash-attn's ``flash_attn_func``).

    Args:
        q: ``(B, Sq, H, D)``; fp16 / bf16 / fp32 / fp64.
        k, v: ``(B, Sk, Hk, D)``, same dtype; ``Hk`` divides ``H``; ``Sq, Sk >= 1``.
        softmax_scale: default ``1 / sqrt(D)``.
        causal: bottom-right aligned mask, as :func:`varlen_attention`.
        return_lse: also return the log-sum-exp of each row, ``(B, H, Sq)`` float32 (float64 for
            float64 inputs); ``-inf`` for a row that sees no key.
        backend: force a backend; default the dispatcher's choice.

    Returns:
        ``(B, Sq, H, D)`` in ``q.dtype``, or ``(out, lse)`` with ``return_lse=True``.
    """
    _check_qkv(q, k, v, ndim=4)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[1] < 1 or k.shape[1] < 1:
        raise ValueError(f"sequence lengths must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    scale = _scale(softmax_scale, q.shape[-1])
    inputs = _inputs(q, causal, q.shape[1] == k.shape[1], q.shape[1])
    out, lse = choose("attention", inputs, backend).forward(q, k, v, scale, bool(causal))
    return (out, lse) if return_lse else out


def varlen_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`varlen_attention` given its output and LSE (flash-attn's
    ``_flash_attn_varlen_backward``), for callers that split attention over key blocks.

    ``out`` and ``lse`` may be those of a larger attention that these keys are one block of (ring
    attention): ``softmax`` is then normalised by the global ``lse`` and the gradients are this
    block's exact share. Shapes as in :func:`varlen_attention`; ``lse`` is ``(H, total_q)`` float32.
    """
    _check_qkv(q, k, v, ndim=3)
    _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    for name, t in (("dout", dout), ("out", out)):
        check_tensor(name, t, ndims=(3,), device=q.device)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    check_same_dtype(("q", "dout", "out"), (q, dout, out))
    check_tensor("lse", lse, ndims=(2,), dtypes=(torch.float32, torch.float64), device=q.device)
    if lse.shape != (q.shape[1], q.shape[0]):
        raise ValueError(f"lse must be (H, total_q) = ({q.shape[1]}, {q.shape[0]}), got {tuple(lse.shape)}")
    inputs = _inputs(q, causal, cu_seqlens_q is cu_seqlens_k, max_seqlen_q, varlen=True)
    impl = choose("varlen_attention", inputs, backend)
    scale = _scale(softmax_scale, q.shape[-1])
    return impl.backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(causal)
    )


# The vendor providers (torch's cuDNN / FlashAttention / memory-efficient kernels, flash-attn,
# xformers) register after fastdit's own backends, with the priority list they share.
from fastdit.ops import attention_policy, attention_providers  # noqa: E402, F401, I001

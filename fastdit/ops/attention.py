"""Softmax attention: ``varlen_attention`` (flash-attn's varlen contract) and dense ``attention``."""

import math

import torch

from fastdit.kernels.launch import triton_missing
from fastdit.ops._common import last_dim_contiguous
from fastdit.ops._registry import interpreter_fake, register_triton_backend, signature, typed
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


@attention_reference.register_fake
def _(q, k, v, softmax_scale, causal):
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    batch, seqlen, heads, _ = q.shape
    return q.new_empty((batch, seqlen, heads, v.shape[-1])), q.new_empty((batch, heads, seqlen), dtype=lse_dtype)


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


def _backward_dense(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward_reference(grad_out, q, k, v, out, lse, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None


attention_reference.register_autograd(_backward_dense, setup_context=_setup_dense)

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


def _inputs(q: torch.Tensor, causal: bool) -> dict:
    """What the dispatcher sees of an attention call (forward and backward alike)."""
    return {"device": q.device, "dtype": q.dtype, "head_dim": q.shape[-1], "causal": bool(causal)}


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
    impl = choose("varlen_attention", _inputs(q, causal), backend)
    out, lse = impl.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(causal))
    return (out, lse) if return_lse else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Dense batched attention in the ``(B, S, H, D)`` layout (flash-attn's ``flash_attn_func``).

    Args:
        q: ``(B, Sq, H, D)``; fp16 / bf16 / fp32 / fp64.
        k, v: ``(B, Sk, Hk, D)``, same dtype; ``Hk`` divides ``H``; ``Sq, Sk >= 1``.
        softmax_scale: default ``1 / sqrt(D)``.
        causal: bottom-right aligned mask, as :func:`varlen_attention`.
        backend: force a backend; default the dispatcher's choice.

    Returns:
        ``(B, Sq, H, D)`` in ``q.dtype``.
    """
    _check_qkv(q, k, v, ndim=4)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[1] < 1 or k.shape[1] < 1:
        raise ValueError(f"sequence lengths must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    scale = _scale(softmax_scale, q.shape[-1])
    out, _ = choose("attention", _inputs(q, causal), backend).forward(q, k, v, scale, bool(causal))
    return out


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
    impl = choose("varlen_attention", _inputs(q, causal), backend)
    scale = _scale(softmax_scale, q.shape[-1])
    return impl.backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(causal)
    )

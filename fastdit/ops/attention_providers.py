"""Vendor attention providers under the one dispatch (docs/design.md, "Dispatch": attention providers).

Beside fastdit's ``triton`` kernel, the CPU ``torch`` backend and the ``reference``, the
``attention`` and ``varlen_attention`` ops have these backends, each with the same signatures,
validation, LSE and explicit backward as the others:

- ``sdpa_flash``: the FlashAttention-2 kernel inside torch (``aten::_flash_attention_forward`` /
  ``_backward``, the op SDPA's flash path calls): native varlen (``cu_seqlens``), bottom-right
  causal, LSE in flash-attn's ``(H, total)`` / ``(B, H, S)`` layouts. fp16 / bf16, head_dim a
  multiple of 8 up to 256, sm80+.
- ``cudnn``: torch's cuDNN attention (``aten::_scaled_dot_product_cudnn_attention``): dense; varlen
  by a per-sample loop (a host read of ``cu_seqlens``, one call per sample). fp16 / bf16, head_dim a
  multiple of 8 up to 128, sm80+, cuDNN 9; causal only where the mask is square (cuDNN aligns it
  top-left, fastdit's contract bottom-right).
- ``sdpa_efficient``: torch's memory-efficient (CUTLASS) kernel
  (``aten::_scaled_dot_product_efficient_attention``): dense, varlen by the per-sample loop; fp16 /
  bf16 / fp32, head_dim a multiple of 8 up to 256; causal only where square.
- ``flash_attn``: the ``flash_attn`` package when installed (FA2's ``flash_attn_func`` /
  ``flash_attn_varlen_func`` with ``return_attn_probs=True`` for the LSE; the explicit backward
  through its ``_flash_attn_backward`` / ``_flash_attn_varlen_backward``, keyword by keyword as the
  installed version names them), or FlashAttention-3's ``flash_attn_interface`` (the Hopper
  build) on sm_90, preferred there when installed.
- ``xformers``: the ``xformers`` package when installed (``memory_efficient_attention_forward_requires_grad``
  and ``memory_efficient_attention_backward``; varlen as a ``BlockDiagonalMask``).

GQA / MQA repeat each K / V head for its query group before the torch kernels and sum the
gradients back (correct on every kernel; the vendors' native GQA is not relied on). A row that sees
no key (causal with Lq > Lk) has output 0 and LSE ``-inf`` whichever provider runs: FlashAttention
reports ``+inf`` there, which is mapped, and mapped back before its backward.

Which one runs: a measured per-device policy (:mod:`fastdit.ops.attention_policy`), else the priority
list set at the end of this module: the vendor kernels before fastdit's Triton kernel, which has not
yet been measured on a GPU.
"""

import functools
import importlib
import importlib.util
import inspect

import torch
import torch.nn.functional as F

from fastdit.ops import attention as _attn
from fastdit.ops._common import last_dim_contiguous
from fastdit.ops._registry import signature, typed
from fastdit.ops.attention import expand_heads, fold_heads, per_sample, per_sample_backward
from fastdit.ops.dispatch import Backend, BackendNotSupportedError, register_backend, set_priority

HALF_DTYPES = (torch.float16, torch.bfloat16)
PROVIDERS = ("flash_attn", "sdpa_flash", "cudnn", "sdpa_efficient", "xformers")
# On GPUs: a vendor kernel first (flash-attn's own package, then torch's FlashAttention-2, the
# most used and checked attention kernel, then cuDNN and the memory-efficient one), fastdit's
# Triton kernel after them until a measured policy ranks it; on CPUs the ``torch`` backend.
# Not a speed claim: docs/performance.md says what is measured, and a policy file replaces it.
ATTENTION_PRIORITY = ("flash_attn", "sdpa_flash", "cudnn", "sdpa_efficient", "xformers", "triton", "torch",
                      "reference")  # fmt: skip


# ---- shared pieces ------------------------------------------------------------------------------


def _no_cuda() -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    return None


@functools.lru_cache(maxsize=16)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _limits(inputs: dict, *, max_head_dim: int, min_sm: int = 80, aligned_causal: bool = False,
            host_reads: bool = False) -> list[str]:  # fmt: skip
    """The reasons a kernel cannot run ``inputs`` (head dim, GPU generation, causal alignment, and
    for a varlen form that reads ``cu_seqlens`` on the host: a CUDA graph being captured)."""
    reasons = []
    if host_reads and inputs.get("capturing"):
        reasons.append("its varlen form reads cu_seqlens on the host, which a CUDA graph capture cannot")
    head_dim = inputs["head_dim"]
    if head_dim % 8 or head_dim > max_head_dim:
        reasons.append(f"head_dim {head_dim} is not a multiple of 8 up to {max_head_dim}")
    if aligned_causal and inputs["causal"] and not inputs["square"]:
        reasons.append("causal with query and key lengths that may differ (this kernel aligns the mask top-left)")
    device = inputs["device"]
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = _capability(device.index)
        if 10 * major + minor < min_sm:
            reasons.append(f"sm_{major}{minor} < sm_{min_sm}")
    return reasons


def _empty_rows_to_minus_inf(lse: torch.Tensor) -> torch.Tensor:
    """FlashAttention's ``+inf`` LSE of a row that sees no key, as fastdit's ``-inf``."""
    return lse.masked_fill(lse == float("inf"), float("-inf"))


def _empty_rows_to_plus_inf(lse: torch.Tensor) -> torch.Tensor:
    """Back to FlashAttention's ``+inf`` for its backward (``exp(s - lse)`` is then 0, not NaN)."""
    return lse.float().masked_fill(lse == float("-inf"), float("inf")).contiguous()


# ---- torch's FlashAttention-2: aten::_flash_attention_forward / _backward ----------------------------


@functools.lru_cache(maxsize=1)
def _flash_rng_like() -> tuple[tuple[int, ...], torch.dtype]:
    """The shape and dtype of the rng state the installed torch's flash forward returns (read from
    its meta kernel): the backward takes one, and reads it only with dropout, which fastdit never uses."""
    q = torch.empty(1, 8, 1, 8, device="meta", dtype=torch.float16)
    rng = torch.ops.aten._flash_attention_forward(q, q, q, None, None, 8, 8, 0.0, False, False, scale=1.0)[2]
    return tuple(rng.shape), rng.dtype


def _flash_dummy_rng(device):
    shape, dtype = _flash_rng_like()
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros((), dtype=dtype, device=device)


def _flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    heads, dim = q.shape[-2], q.dim() - 2
    k, v = (last_dim_contiguous(expand_heads(t, heads, dim)) for t in (k, v))
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        last_dim_contiguous(q), k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale
    )
    return out, _empty_rows_to_minus_inf(lse)


def _flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal):
    heads, kv_heads, dim = q.shape[-2], k.shape[-2], q.dim() - 2
    rng, unused = _flash_dummy_rng(q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        last_dim_contiguous(dout), last_dim_contiguous(q), *(last_dim_contiguous(expand_heads(t, heads, dim))
                                                             for t in (k, v)),
        last_dim_contiguous(out), _empty_rows_to_plus_inf(lse), cu_q, cu_k, max_q, max_k, 0.0, causal, rng, unused,
        scale=scale,
    )  # fmt: skip
    return dq, fold_heads(dk, kv_heads, dim), fold_heads(dv, kv_heads, dim)


def _dense_sdpa_flash(q, k, v, scale, causal):
    return _flash_forward(q, k, v, None, None, q.shape[1], k.shape[1], scale, causal)


def _dense_bwd_sdpa_flash(dout, q, k, v, out, lse, scale, causal):
    return _flash_backward(dout, q, k, v, out, lse, None, None, q.shape[1], k.shape[1], scale, causal)


# ---- torch's cuDNN and memory-efficient attention: the SDPA ops, (B, H, S, D) views ---------------


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    return last_dim_contiguous(t).transpose(1, 2)


@functools.lru_cache(maxsize=1)
def _cudnn_lse_ndim() -> int:
    """The LSE rank the installed torch's cuDNN attention returns and takes back ((B, H, S) or
    (B, H, S, 1), by version), read from its meta kernel."""
    q = torch.empty(1, 1, 8, 8, device="meta", dtype=torch.float16)
    lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, q, q, None, True, 0.0, False, False, scale=1.0)[1]
    return lse.dim()


def _dense_cudnn(q, k, v, scale, causal):
    heads = q.shape[2]
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _bhsd(q), *(_bhsd(expand_heads(t, heads, 2)) for t in (k, v)), None, True, 0.0, causal, False, scale=scale
    )
    return out.transpose(1, 2), lse.reshape(q.shape[0], heads, q.shape[1])


def _dense_bwd_cudnn(dout, q, k, v, out, lse, scale, causal):
    batch, len_q, heads, _ = q.shape
    kv_heads = k.shape[2]
    k, v = (expand_heads(t, heads, 2) for t in (k, v))
    stats = lse.float().reshape(batch, heads, len_q, *([1] * (_cudnn_lse_ndim() - 3))).contiguous()
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), stats, seed, seed, None, None, None, len_q, k.shape[1],
        0.0, causal, scale=scale,
    )  # fmt: skip
    return dq.transpose(1, 2), *(fold_heads(g.transpose(1, 2), kv_heads, 2) for g in (dk, dv))


def _dense_efficient(q, k, v, scale, causal):
    heads = q.shape[2]
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        _bhsd(q), *(_bhsd(expand_heads(t, heads, 2)) for t in (k, v)), None, True, 0.0, causal, scale=scale
    )
    return out.transpose(1, 2), lse[:, :, : q.shape[1]]  # the kernel pads the LSE's rows to a multiple of 32


def _dense_bwd_efficient(dout, q, k, v, out, lse, scale, causal):
    len_q, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
    k, v = (expand_heads(t, heads, 2) for t in (k, v))
    padded = F.pad(lse.float(), (0, -len_q % 32)).contiguous()
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), None, _bhsd(out), padded, seed, seed, 0.0,
        [True, True, True, False], causal, scale=scale,
    )  # fmt: skip
    return dq.transpose(1, 2), *(fold_heads(g.transpose(1, 2), kv_heads, 2) for g in (dk, dv))


# ---- the flash_attn and xformers packages, when installed -----------------------------------------


def _package_missing(module: str, pip_name: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{pip_name} is not installed (pip install {pip_name})"
    return None


def _flash_attn(device: torch.device):
    """(flash-attn's interface module, 3 or 2): FlashAttention-3's ``flash_attn_interface`` (the
    Hopper build) on an sm_90 GPU where it is installed, else FlashAttention-2's."""
    fa2 = importlib.util.find_spec("flash_attn") is not None
    if importlib.util.find_spec("flash_attn_interface") is not None:
        hopper = device.type == "cuda" and torch.cuda.is_available() and _capability(device.index)[0] == 9
        if hopper or not fa2:
            return importlib.import_module("flash_attn_interface"), 3
    return importlib.import_module("flash_attn.flash_attn_interface"), 2


def _call_by_name(fn, values: dict):
    """Call ``fn`` with those of ``values`` that its installed version names (flash-attn's
    functions changed their parameters between releases: ``window_size`` became
    ``window_size_left`` / ``_right``, ``softcap`` arrived, FA3 has one backward for dense and
    varlen); a parameter it needs that is not in ``values`` raises a TypeError that names it."""
    params = inspect.signature(fn).parameters
    return fn(**{name: values[name] for name in params if name in values})


def _fa_options(scale, causal) -> dict:
    return {"dropout_p": 0.0, "softmax_scale": scale, "causal": causal, "window_size": (-1, -1),
            "window_size_left": -1, "window_size_right": -1, "softcap": 0.0, "alibi_slopes": None,
            "deterministic": False, "rng_state": None, "sm_margin": 0, "return_attn_probs": True,
            "cu_seqlens_q": None, "cu_seqlens_k": None, "seqused_q": None, "seqused_k": None,
            "sequed_q": None, "sequed_k": None, "max_seqlen_q": None, "max_seqlen_k": None}  # fmt: skip


def _fa_forward(fn_name, q, k, v, scale, causal, extra=None):
    module, _ = _flash_attn(q.device)
    result = _call_by_name(getattr(module, fn_name), {"q": q, "k": k, "v": v, **_fa_options(scale, causal),
                                                       **(extra or {})})  # fmt: skip
    if not isinstance(result, tuple) or len(result) < 2:
        raise BackendNotSupportedError(f"fastdit attention: {module.__name__}.{fn_name} returned no softmax LSE")
    out, lse = result[:2]
    return out, _empty_rows_to_minus_inf(lse)


def _fa_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    extra = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "max_seqlen_q": max_q, "max_seqlen_k": max_k}
    return _fa_forward("flash_attn_varlen_func", q, k, v, scale, causal, extra)


def _fa_dense(q, k, v, scale, causal):
    return _fa_forward("flash_attn_func", q, k, v, scale, causal)


def _fa_backward(dout, q, k, v, out, lse, extra, scale, causal):
    """The private backward of the installed flash-attn (FA2: ``_flash_attn_backward`` or
    ``_flash_attn_varlen_backward``; FA3: ``_flash_attn_backward`` for both), which writes the
    gradients into the buffers it is given, as ring-attention implementations call it."""
    module, version = _flash_attn(q.device)
    name = "_flash_attn_varlen_backward" if extra and version == 2 else "_flash_attn_backward"
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    values = {**_fa_options(scale, causal), "dout": last_dim_contiguous(dout), "q": q, "k": k, "v": v, "out": out,
              "softmax_lse": _empty_rows_to_plus_inf(lse), "dq": dq, "dk": dk, "dv": dv, **extra}  # fmt: skip
    _call_by_name(getattr(module, name), values)
    return dq, dk, dv


def _fa_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal):
    extra = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "max_seqlen_q": max_q, "max_seqlen_k": max_k}
    return _fa_backward(dout, q, k, v, out, lse, extra, scale, causal)


def _fa_dense_bwd(dout, q, k, v, out, lse, scale, causal):
    return _fa_backward(dout, q, k, v, out, lse, {}, scale, causal)


def _xformers_fmha():
    return importlib.import_module("xformers.ops.fmha")


def _xf_bias(fmha, len_q, len_k, causal, cu_q=None, cu_k=None):
    """xformers' attention bias for fastdit's contract: none, bottom-right causal, or (varlen) the
    block-diagonal mask of the samples, causal from the bottom right of each block."""
    attn_bias = importlib.import_module("xformers.ops.fmha.attn_bias")
    if cu_q is None:
        return attn_bias.LowerTriangularFromBottomRightMask() if causal else None
    lengths_q = [b - a for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:])]
    lengths_k = [b - a for a, b in zip(cu_k.tolist(), cu_k.tolist()[1:])]
    mask = attn_bias.BlockDiagonalMask.from_seqlens(lengths_q, lengths_k)
    return mask.make_causal_from_bottomright() if causal else mask


def _xf_forward(q, k, v, bias, scale):
    """(B, M, H, D) in; out (B, M, H, D), lse (B, H, M) (xformers may pad the LSE's rows)."""
    heads = q.shape[2]
    k, v = (expand_heads(t, heads, 2) for t in (k, v))
    out, lse = _xformers_fmha().memory_efficient_attention_forward_requires_grad(q, k, v, attn_bias=bias, scale=scale)
    return out, lse[:, :, : q.shape[1]].float()


def _xf_backward(dout, q, k, v, out, lse, bias, scale):
    heads, kv_heads = q.shape[2], k.shape[2]
    k, v = (expand_heads(t, heads, 2) for t in (k, v))
    dq, dk, dv = _xformers_fmha().memory_efficient_attention_backward(
        dout, out, lse.float().contiguous(), q, k, v, attn_bias=bias, scale=scale
    )
    return dq, fold_heads(dk, kv_heads, 2), fold_heads(dv, kv_heads, 2)


def _xf_dense(q, k, v, scale, causal):
    return _xf_forward(q, k, v, _xf_bias(_xformers_fmha(), q.shape[1], k.shape[1], causal), scale)


def _xf_dense_bwd(dout, q, k, v, out, lse, scale, causal):
    return _xf_backward(dout, q, k, v, out, lse, _xf_bias(_xformers_fmha(), q.shape[1], k.shape[1], causal), scale)


def _xf_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    bias = _xf_bias(_xformers_fmha(), max_q, max_k, causal, cu_q, cu_k)
    out, lse = _xf_forward(q[None], k[None], v[None], bias, scale)
    return out[0], lse[0]


def _xf_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal):
    bias = _xf_bias(_xformers_fmha(), max_q, max_k, causal, cu_q, cu_k)
    grads = _xf_backward(dout[None], q[None], k[None], v[None], out[None], lse[None], bias, scale)
    return tuple(g[0] for g in grads)


# ---- registration: four custom ops per provider, the shared signatures and autograd -------------


def _contiguous(fn):
    return lambda *args: tuple(t.contiguous() for t in fn(*args))


def _register(name, *, dense, dense_bwd, varlen, varlen_bwd, dtypes, check, unavailable):
    """``fastdit::{attention,varlen_attention}[_backward]_<name>`` with the reference's schema,
    fakes and autograd, and the two backends."""
    ops = {}
    for op, impl, params, returns in (
        ("varlen_attention", varlen, _attn._VARLEN, _attn._PAIR),
        ("varlen_attention_backward", varlen_bwd, _attn._VARLEN_BACKWARD, _attn._TRIPLE),
        ("attention", dense, _attn._DENSE, _attn._PAIR),
        ("attention_backward", dense_bwd, _attn._DENSE_BACKWARD, _attn._TRIPLE),
    ):
        ops[op] = torch.library.custom_op(
            f"fastdit::{op}_{name}", typed(_contiguous(impl), signature(params, returns)), mutates_args=()
        )
    ops["varlen_attention"].register_fake(_attn._fake_varlen)
    ops["varlen_attention_backward"].register_fake(_attn._fake_backward)
    ops["attention"].register_fake(_attn._fake_dense)
    ops["attention_backward"].register_fake(_attn._fake_backward)
    ops["varlen_attention"].register_autograd(
        _attn._backward_varlen_with(ops["varlen_attention_backward"]), setup_context=_attn._setup_varlen
    )
    ops["attention"].register_autograd(
        _attn._backward_dense_with(ops["attention_backward"]), setup_context=_attn._setup_dense
    )
    common = {"devices": ("cuda",), "dtypes": dtypes, "check": check, "unavailable": unavailable}
    register_backend(Backend("varlen_attention", name, ops["varlen_attention"],
                             backward=ops["varlen_attention_backward"], **common))  # fmt: skip
    register_backend(Backend("attention", name, ops["attention"], **common))
    return ops


def _flash_unavailable() -> str | None:
    if _no_cuda():
        return _no_cuda()
    if not torch.backends.cuda.is_flash_attention_available():
        return f"torch {torch.__version__} is built without its FlashAttention kernels"
    return None


def _cudnn_unavailable() -> str | None:
    if _no_cuda():
        return _no_cuda()
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available to torch"
    version = torch.backends.cudnn.version() or 0
    if version < 90000:
        return f"cuDNN {version} < 9.0 (cuDNN attention needs 9)"
    return None


def _flash_attn_unavailable() -> str | None:
    missing = _package_missing("flash_attn", "flash-attn")
    if missing and importlib.util.find_spec("flash_attn_interface") is None:
        reasons = [f"{missing}, nor FlashAttention-3's flash_attn_interface (its hopper/ build)", _no_cuda()]
    else:
        reasons = [_no_cuda()]
    return "; ".join(r for r in reasons if r) or None


def _package_unavailable(module: str, pip_name: str) -> str | None:
    reasons = [r for r in (_package_missing(module, pip_name), _no_cuda()) if r]
    return "; ".join(reasons) or None


SDPA_FLASH = _register(
    "sdpa_flash", dense=_dense_sdpa_flash, dense_bwd=_dense_bwd_sdpa_flash, varlen=_flash_forward,
    varlen_bwd=_flash_backward, dtypes=HALF_DTYPES, check=lambda i: _limits(i, max_head_dim=256),
    unavailable=_flash_unavailable(),
)  # fmt: skip
CUDNN = _register(
    "cudnn", dense=_dense_cudnn, dense_bwd=_dense_bwd_cudnn, varlen=per_sample(_dense_cudnn),
    varlen_bwd=per_sample_backward(_dense_bwd_cudnn), dtypes=HALF_DTYPES,
    check=lambda i: _limits(i, max_head_dim=128, aligned_causal=True, host_reads=True),
    unavailable=_cudnn_unavailable(),
)  # fmt: skip
SDPA_EFFICIENT = _register(
    "sdpa_efficient", dense=_dense_efficient, dense_bwd=_dense_bwd_efficient, varlen=per_sample(_dense_efficient),
    varlen_bwd=per_sample_backward(_dense_bwd_efficient), dtypes=(*HALF_DTYPES, torch.float32),
    check=lambda i: _limits(i, max_head_dim=256, min_sm=50, aligned_causal=True, host_reads=True),
    unavailable=_no_cuda(),
)  # fmt: skip
FLASH_ATTN = _register(
    "flash_attn", dense=_fa_dense, dense_bwd=_fa_dense_bwd, varlen=_fa_varlen, varlen_bwd=_fa_varlen_bwd,
    dtypes=HALF_DTYPES, check=lambda i: _limits(i, max_head_dim=256),
    unavailable=_flash_attn_unavailable(),
)  # fmt: skip
XFORMERS = _register(
    "xformers", dense=_xf_dense, dense_bwd=_xf_dense_bwd, varlen=_xf_varlen, varlen_bwd=_xf_varlen_bwd,
    dtypes=(*HALF_DTYPES, torch.float32),
    check=lambda i: _limits(i, max_head_dim=256, min_sm=50, aligned_causal=True, host_reads=True),
    unavailable=_package_unavailable("xformers", "xformers"),
)  # fmt: skip

for _op in ("attention", "varlen_attention"):
    set_priority(_op, ATTENTION_PRIORITY)

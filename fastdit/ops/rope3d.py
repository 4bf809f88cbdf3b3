"""3D rotary position embedding: ``rope3d`` and ``rope3d_qk``.

Semantics in :mod:`fastdit.reference.rope3d`. Backward is the rotation by the conjugate angle,
the same op with ``conjugate=True``.
"""

import threading
from collections import OrderedDict

import torch

from fastdit._extension import cuda_extension_missing
from fastdit.kernels.launch import triton_missing
from fastdit.ops import dispatch
from fastdit.ops._common import as_packed, as_shape, cast, compute_dtype, last_dim_contiguous, rms_rows
from fastdit.ops._registry import interpreter_fake, register_torch_backend, register_triton_backend, signature, typed
from fastdit.ops.dispatch import Backend, register_backend
from fastdit.ops.validation import FLOAT_DTYPES, check_grid_thw, check_same_dtype, check_tensor, check_token_offset
from fastdit.reference.modulation import rms_norm_ref
from fastdit.reference.rope3d import rope3d_angles, rope3d_ref, wan_axes_dim

# ---- the custom ops' signatures, written once -------------------------------------------------
# Every backend registers the same four ops from these signatures (fastdit::rope3d_<backend>, rope3d_qk_<backend>, and
# on the fast backends their in-place forms); csrc/fastdit_ops.cpp declares the cuda ones alike.

_ROPE_ARGS = [
    ("grid_thw", torch.Tensor), ("cu_seqlens", torch.Tensor), ("token_offset", torch.Tensor | None),
    ("theta", float), ("axes_dim", list[int]), ("interleaved", bool), ("conjugate", bool),
]  # fmt: skip
_PAIR = tuple[torch.Tensor, torch.Tensor]
SIGNATURES = {
    "rope3d": signature([("x", torch.Tensor), *_ROPE_ARGS], torch.Tensor),
    "rope3d_qk": signature([("q", torch.Tensor), ("k", torch.Tensor), *_ROPE_ARGS], _PAIR),
    "rope3d_inplace": signature([("x", torch.Tensor), *_ROPE_ARGS], None),
    "rope3d_qk_inplace": signature([("q", torch.Tensor), ("k", torch.Tensor), *_ROPE_ARGS], None),
}
_ROTATED = {"rope3d": 1, "rope3d_qk": 2}  # leading tensors each op rotates


def _rotation_autograd(op, rotated: int):
    """(backward, setup_context) of a rotation op: the gradient is the same op at the conjugate
    angle, so every backend's backward is its own forward with ``conjugate`` flipped."""

    def setup(ctx, inputs, output):
        ctx.args = inputs[rotated:]

    def backward(ctx, *grads):
        *args, conjugate = ctx.args
        dx = op(*grads, *args, not conjugate)
        return *(dx if isinstance(dx, tuple) else (dx,)), *([None] * len(ctx.args))

    return backward, setup


def _fake(op: str):
    if op.endswith("inplace"):
        return lambda *args: None
    if _ROTATED[op] == 1:
        return lambda x, *args: torch.empty_like(x)
    return lambda q, k, *args: (torch.empty_like(q), torch.empty_like(k))


def _define(backend: str, impls: dict, *, triton: bool = False) -> dict:
    """Register ``fastdit::<op>_<backend>`` for each ``op -> impl`` with the shared schema, its
    fake and (out of place) the conjugate-rotation autograd; returns op -> the custom op."""
    make = torch.library.triton_op if triton else torch.library.custom_op
    defined = {}
    for op, impl in impls.items():
        mutates = () if not op.endswith("inplace") else ("x",) if op == "rope3d_inplace" else ("q", "k")
        custom = make(f"fastdit::{op}_{backend}", typed(impl, SIGNATURES[op]), mutates_args=mutates)
        if triton:
            interpreter_fake(custom, _fake(op))
        else:
            custom.register_fake(_fake(op))
        if op in _ROTATED:
            backward, setup = _rotation_autograd(custom, _ROTATED[op])
            custom.register_autograd(backward, setup_context=setup)
        defined[op] = custom
    return defined


# ---- reference backend: fastdit.reference --------------------------------------------------------


def _rope_ref(x, grid_thw, cu_seqlens, token_offset, theta, axes_dim, interleaved, conjugate):
    return rope3d_ref(x, grid_thw, cu_seqlens, theta=theta, axes_dim=axes_dim, interleaved=interleaved,
                      token_offset=token_offset, conjugate=conjugate)  # fmt: skip


def _rope_qk_ref(q, k, *args):
    return _rope_ref(q, *args), _rope_ref(k, *args)


_reference = _define("reference", {"rope3d": _rope_ref, "rope3d_qk": _rope_qk_ref})
rope3d_reference, rope3d_qk_reference = _reference["rope3d"], _reference["rope3d_qk"]
for _op, _fn in _reference.items():
    register_backend(Backend(_op, "reference", _fn, devices=None, dtypes=FLOAT_DTYPES))


# ---- torch backend: a cached rotation table and one complex multiply ---------------------------
# The table of a (grid, boundaries, offsets) depends on nothing else, and a DiT rotates q and k of
# every layer and every step with the same one: on CPUs (where reading the few integers that key
# it costs no device sync) it is built once, with the reference's precision (float64 angles,
# cos / sin rounded to the rotation dtype), and kept in a small LRU. While compiling, or on other
# devices, it is rebuilt per call from the tensors (traceable, no host read).

ROPE_TABLE_CACHE_SIZE = 16
_tables: OrderedDict = OrderedDict()
_tables_lock = threading.Lock()


def _rope_table(grid_thw, cu_seqlens, token_offset, total, theta, axes_dim, dtype):
    """``(cos, sin, cis)`` of every (token, pair)'s angle: ``(total, 1, sum(axes_dim) / 2)`` in
    ``dtype``, and ``cos + i sin`` as a complex tensor for the eager complex multiply (None while
    compiling, where inductor has no complex codegen, and off CPUs)."""

    def build(grid, cu, offset):
        angle = rope3d_angles(grid, cu, total, theta=theta, axes_dim=axes_dim, token_offset=offset)
        return angle.cos().to(dtype)[:, None, :], angle.sin().to(dtype)[:, None, :]

    if torch.compiler.is_compiling() or grid_thw.device.type != "cpu":
        return (*build(grid_thw, cu_seqlens, token_offset), None)
    key = (
        tuple(grid_thw.flatten().tolist()),
        tuple(cu_seqlens.tolist()),
        None if token_offset is None else tuple(token_offset.tolist()),
        total,
        theta,
        tuple(axes_dim),
        dtype,
    )
    with _tables_lock:
        table = _tables.get(key)
        if table is not None:
            _tables.move_to_end(key)
            return table
    # From host copies of the keys, outside inference mode and autograd: plain tensors that any
    # later call may save for backward, whatever mode the first call ran in.
    with torch.inference_mode(False), torch.no_grad():
        cos, sin = build(
            torch.tensor(key[0], dtype=torch.int64).view(-1, 3),
            torch.tensor(key[1], dtype=torch.int64),
            None if key[2] is None else torch.tensor(key[2], dtype=torch.int64),
        )
        table = (cos, sin, torch.complex(cos, sin))
    with _tables_lock:
        _tables[key] = table
        while len(_tables) > ROPE_TABLE_CACHE_SIZE:
            _tables.popitem(last=False)
    return table


def _whole_pairs(x: torch.Tensor) -> bool:
    """Whether ``view_as_complex`` can view x's last dim as (re, im) pairs in place."""
    return x.stride(-1) == 1 and x.storage_offset() % 2 == 0 and all(st % 2 == 0 for st in x.stride()[:-1])


def _rotate_torch(x, table, interleaved, conjugate):
    """``x (total, H, D)`` rotated by ``table``: its (2i, 2i+1) pairs as one complex multiply
    (eager) or the real formula (compiled, strided), or its (i, i + D/2) halves; math in the
    table's dtype, result in x.dtype."""
    cos, sin, cis = table
    if conjugate:
        sin, cis = -sin, None if cis is None else cis.conj()
    xf = cast(x, compute_dtype(x.dtype))
    if interleaved:
        if cis is not None and _whole_pairs(xf):
            return cast(torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * cis).flatten(-2), x.dtype)
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return cast(torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2), x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return cast(torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1), x.dtype)


def _rope_torch(x, grid_thw, cu_seqlens, token_offset, theta, axes_dim, interleaved, conjugate):
    table = _rope_table(grid_thw, cu_seqlens, token_offset, x.shape[0], theta, axes_dim, compute_dtype(x.dtype))
    return _rotate_torch(x, table, interleaved, conjugate)


def _rope_qk_torch(q, k, grid_thw, cu_seqlens, token_offset, theta, axes_dim, interleaved, conjugate):
    table = _rope_table(grid_thw, cu_seqlens, token_offset, q.shape[0], theta, axes_dim, compute_dtype(q.dtype))
    return _rotate_torch(q, table, interleaved, conjugate), _rotate_torch(k, table, interleaved, conjugate)


def _rope_qk_norm_torch(q, k, q_weight, k_weight, eps, grid_thw, cu_seqlens, token_offset, theta, axes_dim,
                        interleaved):  # fmt: skip
    """RMSNorm across heads (rounded to the dtype, as the unfused pair), then the rotation."""
    acc = compute_dtype(q.dtype)

    def norm(x, weight):
        return cast(rms_rows(cast(x.reshape(x.shape[0], -1), acc), cast(weight, acc), eps), x.dtype).view(x.shape)

    return _rope_qk_torch(norm(q, q_weight), norm(k, k_weight), grid_thw, cu_seqlens, token_offset, theta, axes_dim,
                          interleaved, False)  # fmt: skip


register_torch_backend("rope3d", _rope_torch)
register_torch_backend("rope3d_qk", _rope_qk_torch)
register_torch_backend("rope3d_qk_norm", _rope_qk_norm_torch)


# ---- triton backend: kernels/rope3d.py ----------------------------------------------------------

if triton_missing() is None:
    from fastdit.kernels.rope3d import rope3d_forward

    def _rope_triton(x, *args):
        x = last_dim_contiguous(x)
        out = torch.empty_like(x)
        rope3d_forward(x, None, out, None, *args)
        return out

    def _rope_qk_triton(q, k, *args):
        q, k = last_dim_contiguous(q), last_dim_contiguous(k)
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        rope3d_forward(q, k, q_out, k_out, *args)
        return q_out, k_out

    # In place: for inference (a mutating op carries no autograd; the public functions use the
    # out-of-place op when gradients are needed).
    def _rope_inplace_triton(x, *args):
        rope3d_forward(x, None, x, None, *args)

    def _rope_qk_inplace_triton(q, k, *args):
        rope3d_forward(q, k, q, k, *args)

    _triton = _define(
        "triton",
        {"rope3d": _rope_triton, "rope3d_qk": _rope_qk_triton, "rope3d_inplace": _rope_inplace_triton,
         "rope3d_qk_inplace": _rope_qk_inplace_triton},
        triton=True,
    )  # fmt: skip
    rope3d_triton, rope3d_qk_triton = _triton["rope3d"], _triton["rope3d_qk"]
    register_triton_backend("rope3d", rope3d_triton, inplace=_triton["rope3d_inplace"])
    register_triton_backend("rope3d_qk", rope3d_qk_triton, inplace=_triton["rope3d_qk_inplace"])
else:
    register_triton_backend("rope3d", None)
    register_triton_backend("rope3d_qk", None)


# ---- q/k RMSNorm across heads fused into rope3d_qk: op "rope3d_qk_norm" ------------------------


def _norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_ref(x.reshape(x.shape[0], -1), weight, eps).view(x.shape)


def rope3d_qk_norm_reference(q, k, q_weight, k_weight, eps, grid_thw, cu_seqlens, token_offset, theta, axes_dim,
                             interleaved):  # fmt: skip
    """The unfused pair: RMSNorm across heads (rounded to the dtype), then the reference rotation."""
    args = (grid_thw, cu_seqlens, token_offset, theta, axes_dim, interleaved, False)
    return rope3d_qk_reference(_norm_heads(q, q_weight, eps), _norm_heads(k, k_weight, eps), *args)


register_backend(Backend("rope3d_qk_norm", "reference", rope3d_qk_norm_reference, devices=None, dtypes=FLOAT_DTYPES))

if triton_missing() is None:
    _NORM_ARGS = [("q", torch.Tensor), ("k", torch.Tensor), ("q_weight", torch.Tensor), ("k_weight", torch.Tensor),
                  ("eps", float), *_ROPE_ARGS[:-1]]  # fmt: skip

    def _rope_qk_norm_triton(q, k, q_weight, k_weight, eps, grid_thw, cu_seqlens, token_offset, theta, axes_dim,
                             interleaved):  # fmt: skip
        q, k = last_dim_contiguous(q), last_dim_contiguous(k)
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        rope3d_forward(
            q, k, q_out, k_out, grid_thw, cu_seqlens, token_offset, theta, axes_dim, interleaved, False,
            q_norm_weight=q_weight.contiguous(), k_norm_weight=k_weight.contiguous(), norm_eps=eps,
        )  # fmt: skip
        return q_out, k_out

    rope3d_qk_norm_triton = torch.library.triton_op(
        "fastdit::rope3d_qk_norm_triton", typed(_rope_qk_norm_triton, signature(_NORM_ARGS, _PAIR)), mutates_args=()
    )

    def _qk_norm_setup(ctx, inputs, output):
        q, k, q_weight, k_weight, ctx.eps, grid, cu, offset, ctx.theta, ctx.axes_dim, ctx.interleaved = inputs
        ctx.save_for_backward(q, k, q_weight, k_weight, grid, cu, offset)

    def _rms_norm_backward(grad, x, weight, eps):
        """RMSNorm-across-heads backward in one Triton pass: the declared backward form of the
        rms_norm op's triton backend, taken from the dispatcher's table (dx, dweight)."""
        rows = x.reshape(x.shape[0], -1)
        dx, dweight = dispatch.form("rms_norm", "triton", "backward")(grad.reshape(rows.shape), rows, weight, eps)
        return dx.view(x.shape), dweight

    def _qk_norm_backward(ctx, grad_q, grad_k):
        # Two Triton passes: undo the rotation (conjugate angles), then RMSNorm's backward.
        q, k, q_weight, k_weight, grid, cu, offset = ctx.saved_tensors
        args = (grid, cu, offset, ctx.theta, ctx.axes_dim, ctx.interleaved, True)
        gq, gk = rope3d_qk_triton(grad_q, grad_k, *args)
        dq, dq_weight = _rms_norm_backward(gq, q, q_weight, ctx.eps)
        dk, dk_weight = _rms_norm_backward(gk, k, k_weight, ctx.eps)
        return dq, dk, dq_weight, dk_weight, *([None] * 7)

    interpreter_fake(rope3d_qk_norm_triton, lambda q, k, *args: (torch.empty_like(q), torch.empty_like(k)))
    rope3d_qk_norm_triton.register_autograd(_qk_norm_backward, setup_context=_qk_norm_setup)
    register_triton_backend("rope3d_qk_norm", rope3d_qk_norm_triton)
else:
    register_triton_backend("rope3d_qk_norm", None)


# ---- cuda backend: csrc/rope3d.cu (the same signatures, declared in csrc/fastdit_ops.cpp) ------------------


def _register_cuda_ops() -> None:
    """Fakes and autograd of the ``fastdit::rope3d*_cuda`` ops that fastdit._C defines."""
    for op in SIGNATURES:
        name = f"fastdit::{op}_cuda"
        torch.library.register_fake(name, _fake(op))
        if op in _ROTATED:
            backward, setup = _rotation_autograd(getattr(torch.ops.fastdit, f"{op}_cuda").default, _ROTATED[op])
            torch.library.register_autograd(name, backward, setup_context=setup)


_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
if cuda_extension_missing() is None:
    _register_cuda_ops()
    _cuda_fns = {
        "rope3d": (torch.ops.fastdit.rope3d_cuda.default, torch.ops.fastdit.rope3d_inplace_cuda.default),
        "rope3d_qk": (torch.ops.fastdit.rope3d_qk_cuda.default, torch.ops.fastdit.rope3d_qk_inplace_cuda.default),
    }
else:
    _cuda_fns = {"rope3d": (None, None), "rope3d_qk": (None, None)}
for _op, (_fn, _inplace) in _cuda_fns.items():
    register_backend(
        Backend(
            _op,
            "cuda",
            _fn,
            devices=("cuda",),
            dtypes=_CUDA_DTYPES,
            unavailable=cuda_extension_missing(),
            inplace=_inplace,
        )
    )


# ---- public API --------------------------------------------------------------------------------


def _check_axes(head_dim: int, axes_dim) -> list[int]:
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embedding, got {head_dim}")
    axes = list(wan_axes_dim(head_dim) if axes_dim is None else axes_dim)
    if len(axes) != 3 or any(not isinstance(a, int) or a < 0 or a % 2 for a in axes):
        raise ValueError(f"axes_dim must be three even non-negative ints (dt, dh, dw), got {axes_dim}")
    if sum(axes) != head_dim:
        raise ValueError(f"axes_dim {tuple(axes)} must sum to head_dim {head_dim}")
    return axes


def _can_write_in_place(impl: dispatch.Choice, x: torch.Tensor) -> bool:
    """A true in-place kernel needs a contiguous x (so the packed view aliases it) and no autograd."""
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    return impl.has_inplace() and x.is_contiguous() and not needs_grad


def _prepare(name, x, grid_thw, cu_seqlens, theta, axes_dim, token_offset):
    packed, cu = as_packed(name, x, cu_seqlens, packed_ndim=3)
    axes = _check_axes(packed.shape[-1], axes_dim)
    check_grid_thw(grid_thw, cu)
    check_token_offset(token_offset, cu.shape[0] - 1, x.device)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ValueError(f"theta must be a positive number, got {theta!r}")
    return packed, cu, axes


def rope3d(
    x: torch.Tensor,
    grid_thw: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    theta: float = 10000.0,
    axes_dim: tuple[int, int, int] | None = None,
    interleaved: bool = True,
    token_offset: torch.Tensor | None = None,
    inplace: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Rotate ``x`` by the 3D rotary embedding of each token's (t, h, w) patch position.

    Args:
        x: ``(total, H, D)`` packed tokens with ``cu_seqlens``, or dense ``(B, S, H, D)``;
            float16 / bfloat16 / float32 / float64. ``D`` even.
        grid_thw: ``(B, 3)`` int32 (or int64): each sample's post-patch (t, h, w); its tokens are
            in (t, h, w) row-major order. Tokens beyond ``t*h*w`` are not rotated.
        cu_seqlens: ``(B+1,)`` int32 sample boundaries of packed ``x``; None for dense ``x``.
        theta: rotary base (Wan 10000, HunyuanVideo 256).
        axes_dim: ``(dt, dh, dw)`` even sizes summing to D; default Wan's
            ``(D - 4(D//6), 2(D//6), 2(D//6))``, (44, 42, 42) for D = 128.
        interleaved: rotate pairs (2i, 2i+1) (Wan) if True, (i, i + D/2) if False.
        token_offset: ``(B,)`` int32/int64 global index of each sample's first token (a shard of
            a longer sequence), default 0.
        inplace: write the result into ``x`` and return ``x``.
        backend: force ``"reference"`` / ``"triton"`` / ``"cuda"``; default the dispatcher's choice.

    Returns:
        The rotated tensor, same shape and dtype as ``x``. Angles are float64, rotation float32
        (see :mod:`fastdit.reference.rope3d`).
    """
    packed, cu, axes = _prepare("x", x, grid_thw, cu_seqlens, theta, axes_dim, token_offset)
    impl = dispatch.choose(
        "rope3d",
        {"device": x.device, "dtype": x.dtype, "head_dim": packed.shape[-1], "interleaved": interleaved},
        backend,
    )
    args = (grid_thw, cu, token_offset, float(theta), axes, interleaved, False)
    if inplace and _can_write_in_place(impl, x):
        impl.inplace(packed, *args)
        return x
    out = as_shape(impl.forward(packed, *args), x.shape)
    return x.copy_(out) if inplace else out


def rope3d_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    grid_thw: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    theta: float = 10000.0,
    axes_dim: tuple[int, int, int] | None = None,
    interleaved: bool = True,
    token_offset: torch.Tensor | None = None,
    inplace: bool = False,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope3d` on queries and keys of the same tokens in one call.

    Args:
        q: ``(total, Hq, D)`` packed or ``(B, S, Hq, D)`` dense.
        k: ``(total, Hk, D)`` / ``(B, S, Hk, D)``, same tokens, dtype and D as ``q``; Hk may differ (GQA).
        q_norm_weight, k_norm_weight: ``(Hq * D,)`` and ``(Hk * D,)``: RMSNorm each token's q and k
            across all heads first (Wan's ``rms_norm_across_heads``; fp32 statistics, the normed
            value rounded to the dtype, as the unfused pair computes it). Both or neither.
        norm_eps: the RMSNorm epsilon.
        Everything else as :func:`rope3d`.

    Returns:
        ``(q_rotated, k_rotated)``, shapes and dtypes of ``q`` and ``k``.
    """
    packed_q, cu, axes = _prepare("q", q, grid_thw, cu_seqlens, theta, axes_dim, token_offset)
    check_tensor("k", k, ndims=(q.dim(),), device=q.device)
    check_same_dtype(("q", "k"), (q, k))
    if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in every dim but the head count")
    packed_k = as_shape(k, (packed_q.shape[0], *k.shape[-2:]))
    if q_norm_weight is not None or k_norm_weight is not None:
        return _rope3d_qk_norm(
            q, k, packed_q, packed_k, grid_thw, cu, token_offset, theta, axes, interleaved, inplace,
            q_norm_weight, k_norm_weight, norm_eps, backend,
        )  # fmt: skip
    impl = dispatch.choose(
        "rope3d_qk",
        {"device": q.device, "dtype": q.dtype, "head_dim": packed_q.shape[-1], "interleaved": interleaved},
        backend,
    )
    args = (grid_thw, cu, token_offset, float(theta), axes, interleaved, False)
    if inplace and _can_write_in_place(impl, q) and _can_write_in_place(impl, k):
        impl.inplace(packed_q, packed_k, *args)
        return q, k
    out_q, out_k = impl.forward(packed_q, packed_k, *args)
    out_q, out_k = as_shape(out_q, q.shape), as_shape(out_k, k.shape)
    if inplace:
        return q.copy_(out_q), k.copy_(out_k)
    return out_q, out_k


def _rope3d_qk_norm(q, k, packed_q, packed_k, grid_thw, cu, token_offset, theta, axes, interleaved, inplace,
                    q_weight, k_weight, eps, backend):  # fmt: skip
    """rope3d_qk with the q/k RMSNorm across heads fused in (op ``rope3d_qk_norm``)."""
    if q_weight is None or k_weight is None:
        raise ValueError("q_norm_weight and k_norm_weight go together: pass both or neither")
    for name, weight, x in (("q_norm_weight", q_weight, packed_q), ("k_norm_weight", k_weight, packed_k)):
        check_tensor(name, weight, ndims=(1,), device=q.device)
        if weight.shape[0] != x.shape[1] * x.shape[2]:
            raise ValueError(
                f"{name} must have shape (H * D,) = ({x.shape[1] * x.shape[2]},), got {tuple(weight.shape)}"
            )
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise ValueError(f"norm_eps must be a positive number, got {eps!r}")
    impl = dispatch.choose(
        "rope3d_qk_norm",
        {"device": q.device, "dtype": q.dtype, "head_dim": packed_q.shape[-1], "interleaved": interleaved},
        backend,
    )
    out_q, out_k = impl.forward(
        packed_q, packed_k, q_weight, k_weight, float(eps), grid_thw, cu, token_offset, float(theta), axes, interleaved
    )
    out_q, out_k = as_shape(out_q, q.shape), as_shape(out_k, k.shape)
    if inplace:
        return q.copy_(out_q), k.copy_(out_k)
    return out_q, out_k

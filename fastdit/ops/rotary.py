"""Rotary embedding from cos / sin tables: ``rotary``, ``rotary_qk`` and ``rotary_tables``.

Every family's RoPE is a table of angles per (token, pair) and a pairing of the head's features;
``rope3d`` computes Wan's table in-kernel from the grid, ``rotary`` takes any table: per-axis
theta and dims, fractional or scaled positions (LTX, CogVideoX), learned frequencies (Mochi),
one table per head (Mochi, LTX-2's split RoPE), interleaved or half-split pairs, a rotated prefix
of the head with the rest passed through. Semantics in :mod:`fastdit.reference.rotary`; the
backward is the same op at the conjugate angle. Tables are constants: a table that requires a
gradient is refused by name rather than given none.
"""

import torch

from fastdit.kernels.launch import triton_missing
from fastdit.ops._common import cast, compute_dtype, last_dim_contiguous
from fastdit.ops._registry import interpreter_fake, register_torch_backend, register_triton_backend, signature, typed
from fastdit.ops.dispatch import Backend, choose, register_backend
from fastdit.ops.validation import FLOAT_DTYPES, check_tensor
from fastdit.reference.rotary import rotary_ref, rotary_tables_ref, rotate_pairs

_SIGNATURE = signature([("x", torch.Tensor), ("cos", torch.Tensor), ("sin", torch.Tensor), ("interleaved", bool),
                        ("conjugate", bool)], torch.Tensor)  # fmt: skip


def _autograd(op):
    def setup(ctx, inputs, output):
        _, ctx.cos, ctx.sin, ctx.interleaved, ctx.conjugate = inputs

    def backward(ctx, grad):
        return op(grad.contiguous(), ctx.cos, ctx.sin, ctx.interleaved, not ctx.conjugate), None, None, None, None

    return backward, setup


def _define(name: str, impl, *, triton: bool = False):
    make = torch.library.triton_op if triton else torch.library.custom_op
    op = make(f"fastdit::rotary_{name}", typed(impl, _SIGNATURE), mutates_args=())
    fake = lambda x, *args: torch.empty_like(x, memory_format=torch.contiguous_format)  # noqa: E731
    if triton:
        interpreter_fake(op, fake)
    else:
        op.register_fake(fake)
    backward, setup = _autograd(op)
    op.register_autograd(backward, setup_context=setup)
    return op


# ---- reference -----------------------------------------------------------------------------------


def _rotary_reference(x, cos, sin, interleaved, conjugate):
    return rotary_ref(x, cos, sin, interleaved=interleaved, conjugate=conjugate).contiguous()


rotary_reference = _define("reference", _rotary_reference)
register_backend(Backend("rotary", "reference", rotary_reference, devices=None, dtypes=FLOAT_DTYPES))


# ---- torch: the formula in the compute dtype, tables broadcast over the samples -----------------


def _rotary_torch(x, cos, sin, interleaved, conjugate):
    acc = compute_dtype(x.dtype)
    n, heads, dim = x.shape
    rows = cos.shape[0]
    c, s = cast(cos, acc), cast(sin, acc)
    if conjugate:
        s = -s
    xf = cast(x, acc).unflatten(0, (n // rows, rows)) if rows else cast(x, acc)[None]  # tables broadcast
    return cast(rotate_pairs(xf, c, s, interleaved).reshape(n, heads, dim), x.dtype)


register_torch_backend("rotary", _rotary_torch)


# ---- triton: kernels/rotary.py -------------------------------------------------------------------

if triton_missing() is None:
    from fastdit.kernels.rotary import rotary_forward

    def _rotary_triton(x, cos, sin, interleaved, conjugate):
        return rotary_forward(last_dim_contiguous(x), cos.contiguous(), sin.contiguous(), interleaved, conjugate)

    rotary_triton = _define("triton", _rotary_triton, triton=True)
    register_triton_backend("rotary", rotary_triton)
else:
    register_triton_backend("rotary", None)


# ---- public API ----------------------------------------------------------------------------------


def _tables(cos, sin, x, packed_rows: int, dense_seq: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin as ``(T, Hc, P)``: T the number of tokens, or (dense x) the sequence length, which
    every sample then shares."""
    check_tensor("cos", cos, ndims=(2, 3, 4), device=x.device)
    check_tensor("sin", sin, ndims=(2, 3, 4), device=x.device)
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("fastdit.rotary computes no gradient for cos / sin: pass detached tables (learned "
                         "frequencies are trained through the model's own RoPE code)")  # fmt: skip
    heads, dim = x.shape[-2:]
    if cos.dim() == 4:
        if dense_seq is None or cos.shape[1] != dense_seq:
            raise ValueError(f"4-dim cos / sin are (B, S, Hc, P) tables of dense x; got {tuple(cos.shape)} for x "
                             f"{tuple(x.shape)}")  # fmt: skip
        cos, sin = cos.flatten(0, 1), sin.flatten(0, 1)
    elif cos.dim() == 2:
        cos, sin = cos[:, None], sin[:, None]
    rows, table_heads, pairs = cos.shape
    if table_heads not in (1, heads):
        raise ValueError(f"cos / sin hold {table_heads} heads; expected 1 (shared) or x's {heads}")
    if 2 * pairs > dim:
        raise ValueError(f"cos / sin rotate {2 * pairs} features (2 x their last dim), more than head_dim {dim}")
    allowed = (packed_rows,) if dense_seq is None else (dense_seq, packed_rows)
    if rows not in allowed:
        what = "the token count" if dense_seq is None else "S or B x S"
        raise ValueError(f"cos / sin have {rows} rows; expected {what} ({' or '.join(map(str, allowed))})")
    return cos, sin


def rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    interleaved: bool = True,
    conjugate: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Rotate ``x`` by the angles whose cosines and sines are ``cos`` / ``sin``.

    Args:
        x: packed ``(total, H, D)`` or dense ``(B, S, H, D)``; fp16 / bf16 / fp32 / fp64.
        cos, sin: one table each, same shape, any float dtype (math in float32, float64 for
            float64 x): ``(rows, P)`` for every head or ``(rows, Hc, P)`` with ``Hc`` 1 or H; rows
            = the token count (``total``, or ``B*S``), or for dense x ``S`` (shared by every sample);
            dense x also takes ``(B, S, Hc, P)``. The first ``2P <= D`` features of each head rotate.
        interleaved: pairs ``(x[2p], x[2p+1])``; False: ``(x[p], x[p+P])``.
        conjugate: rotate by the negative angle (the inverse rotation).
        backend: force a backend (``reference``, ``torch``, ``triton``).

    Returns:
        ``x``'s shape and dtype; features ``2P..D`` equal x's.
    """
    check_tensor("x", x, ndims=(3, 4))
    dense_seq = x.shape[1] if x.dim() == 4 else None
    packed = x.reshape(-1, *x.shape[-2:]) if x.dim() == 4 else x
    cos, sin = _tables(cos, sin, x, packed.shape[0], dense_seq)
    inputs = {"device": x.device, "dtype": x.dtype, "head_dim": x.shape[-1], "interleaved": bool(interleaved)}
    out = choose("rotary", inputs, backend).forward(packed, cos, sin, bool(interleaved), bool(conjugate))
    return out.view(x.shape)


def rotary_qk(q, k, cos, sin, *, interleaved=True, conjugate=False, backend=None):
    """:func:`rotary` of ``q`` and ``k`` with the same tables (self-attention's two calls)."""
    options = {"interleaved": interleaved, "conjugate": conjugate, "backend": backend}
    return rotary(q, cos, sin, **options), rotary(k, cos, sin, **options)


def rotary_tables(positions: torch.Tensor, axes_dim, theta=10000.0, *, freqs=None, dtype=torch.float32):
    """``(cos, sin)`` ``(N, sum(axes_dim) / 2)`` in ``dtype`` for positions ``(N, A)``, angles in float64.

    Axis ``a`` owns ``axes_dim[a] / 2`` consecutive pairs, rotated by ``pos[:, a] * f`` with
    ``f_j = theta_a ** (-2 j / axes_dim[a])``: ``theta`` one number or one per axis (Cosmos's
    NTK-scaled thetas), positions fractional or scaled as the family computes them (CogVideoX's
    crop grid, LTX's fractions of the base size); ``freqs`` (one 1-D tensor per axis) replaces
    the theta schedule (LTX's log-spaced frequencies, Mochi's learned ones).
    """
    check_tensor("positions", positions, ndims=(2,), dtypes=None)
    if positions.shape[1] != len(axes_dim):
        raise ValueError(f"positions has {positions.shape[1]} axes, axes_dim {list(axes_dim)} names {len(axes_dim)}")
    if any(not isinstance(d, int) or d < 0 or d % 2 for d in axes_dim):
        raise ValueError(f"axes_dim must be even non-negative ints, got {list(axes_dim)}")
    if not isinstance(theta, (int, float)) and len(theta) != len(axes_dim):
        raise ValueError(f"theta must be a number or one per axis ({len(axes_dim)}), got {theta!r}")
    if freqs is not None and [len(f) for f in freqs] != [d // 2 for d in axes_dim]:
        raise ValueError(f"freqs must hold axes_dim[a] / 2 frequencies per axis, got {[len(f) for f in freqs]}")
    cos, sin = rotary_tables_ref(positions, axes_dim, theta, freqs=freqs)
    return cos.to(dtype), sin.to(dtype)

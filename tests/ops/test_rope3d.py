import itertools
import math

import pytest
import torch

from fastdit import ops
from fastdit.ops.rope3d import rope3d_qk_reference, rope3d_reference
from tests.conftest import packed_cu

# fp32 runs in fp32 with float64 angles; fp16 rounds once at the end.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3}


def rope_oracle(x, grids, lengths, *, theta=10000.0, axes=None, interleaved=True, offsets=None):
    """Independent float64 oracle: complex rotation with positions enumerated by itertools."""
    d = x.shape[-1]
    if axes is None:
        hw = 2 * (d // 6)
        axes = (d - 2 * hw, hw, hw)
    freqs = []
    for dim in axes:
        freqs += [theta ** (-(2 * i) / dim) for i in range(dim // 2)]
    axis_of = [a for a, dim in enumerate(axes) for _ in range(dim // 2)]
    out = x.double().clone()
    start = 0
    for b, ((t, h, w), n) in enumerate(zip(grids, lengths)):
        positions = list(itertools.product(range(t), range(h), range(w)))
        off = 0 if offsets is None else offsets[b]
        for j in range(n):
            g = off + j
            if g >= len(positions):
                continue
            pos = positions[g]
            angle = torch.tensor([pos[axis_of[i]] * freqs[i] for i in range(d // 2)], dtype=torch.float64)
            rot = torch.polar(torch.ones_like(angle), angle)
            row = x[start + j].double()
            if interleaved:
                c = torch.complex(row[:, 0::2], row[:, 1::2]) * rot
                out[start + j, :, 0::2], out[start + j, :, 1::2] = c.real, c.imag
            else:
                c = torch.complex(row[:, : d // 2], row[:, d // 2 :]) * rot
                out[start + j, :, : d // 2], out[start + j, :, d // 2 :] = c.real, c.imag
        start += n
    return out


# (grids, lengths): an image among videos, a single-token sample, tokens beyond t*h*w.
CASES = [
    ([(2, 3, 4)], [24]),
    ([(1, 3, 5), (3, 2, 2), (1, 1, 1)], [15, 12, 1]),
    ([(2, 2, 3), (1, 4, 1)], [14, 4]),  # 2 padding tokens past t*h*w in sample 0
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("head_dim", [12, 64, 96, 128])
@pytest.mark.parametrize("case", CASES)
def test_rope3d_matches_oracle(dtype, head_dim, case):
    grids, lengths = case
    x = torch.randn(sum(lengths), 3, head_dim, dtype=dtype)
    out = ops.rope3d(x, torch.tensor(grids, dtype=torch.int32), packed_cu(lengths))
    expect = rope_oracle(x, grids, lengths)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), expect, atol=TOL[dtype] * 4, rtol=TOL[dtype])


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope3d_theta_axes_layout_offsets(interleaved):
    grids, lengths = [(4, 2, 3), (2, 3, 3)], [5, 7]
    offsets = [9, 3]
    x = torch.randn(12, 2, 16, dtype=torch.float64)
    out = ops.rope3d(
        x,
        torch.tensor(grids, dtype=torch.int32),
        packed_cu(lengths),
        theta=256.0,
        axes_dim=(4, 6, 6),
        interleaved=interleaved,
        token_offset=torch.tensor(offsets, dtype=torch.int32),
    )
    expect = rope_oracle(x, grids, lengths, theta=256.0, axes=(4, 6, 6), interleaved=interleaved, offsets=offsets)
    torch.testing.assert_close(out, expect, atol=1e-12, rtol=1e-12)


def test_rope3d_wan_axis_split_and_identity_at_origin():
    # Wan's (44, 42, 42) split for D = 128: token 0 is at (0, 0, 0) and is not rotated.
    x = torch.randn(6, 1, 128)
    out = ops.rope3d(x, torch.tensor([[1, 2, 3]], dtype=torch.int32), packed_cu([6]))
    torch.testing.assert_close(out[0], x[0])
    # Token 1 is (0, 0, 1): only the w pairs (the last 21) rotate, the first 43 pairs do not.
    torch.testing.assert_close(out[1, :, :86], x[1, :, :86])
    assert not torch.allclose(out[1, :, 86:], x[1, :, 86:])


def test_rope3d_dense_equals_packed():
    x = torch.randn(2, 12, 2, 24)
    grid = torch.tensor([[1, 3, 4], [2, 2, 3]], dtype=torch.int32)
    dense = ops.rope3d(x, grid)
    packed = ops.rope3d(x.reshape(24, 2, 24), grid, packed_cu([12, 12]))
    torch.testing.assert_close(dense.reshape(24, 2, 24), packed, atol=0, rtol=0)


def test_rope3d_inplace_writes_into_x():
    x = torch.randn(10, 2, 12)
    x_orig = x.clone()
    grid, cu = torch.tensor([[2, 1, 5]], dtype=torch.int32), packed_cu([10])
    out = ops.rope3d(x, grid, cu, inplace=True)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out, ops.rope3d(x_orig, grid, cu))


def test_rope3d_qk_equals_two_calls_and_allows_gqa():
    q, k = torch.randn(15, 4, 24), torch.randn(15, 2, 24)
    grid, cu = torch.tensor([[1, 3, 5]], dtype=torch.int32), packed_cu([15])
    rq, rk = ops.rope3d_qk(q, k, grid, cu)
    torch.testing.assert_close(rq, ops.rope3d(q, grid, cu), atol=0, rtol=0)
    torch.testing.assert_close(rk, ops.rope3d(k, grid, cu), atol=0, rtol=0)


def test_rope3d_is_norm_preserving_and_inverted_by_its_backward():
    x = torch.randn(20, 2, 12, dtype=torch.float64, requires_grad=True)
    grid, cu = torch.tensor([[2, 2, 5]], dtype=torch.int32), packed_cu([20])
    out = ops.rope3d(x, grid, cu)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    # The VJP of a rotation is its inverse: grad of <out, out> w.r.t. x is 2x.
    (out * out).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())


def test_rope3d_gradcheck():
    grid, cu = torch.tensor([[1, 2, 3], [2, 1, 1]], dtype=torch.int32), packed_cu([6, 3])
    x = torch.randn(9, 2, 12, dtype=torch.float64, requires_grad=True)
    k = torch.randn(9, 1, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.rope3d(t, grid, cu, interleaved=False), (x,))
    assert torch.autograd.gradcheck(lambda a, b: ops.rope3d_qk(a, b, grid, cu), (x, k))


def test_rope3d_opcheck():
    grid, cu = torch.tensor([[1, 2, 3]], dtype=torch.int32), packed_cu([6])
    x = torch.randn(6, 2, 12, requires_grad=True)
    torch.library.opcheck(rope3d_reference, (x, grid, cu, None, 10000.0, [4, 4, 4], True, False))
    k = torch.randn(6, 1, 12, requires_grad=True)
    off = torch.tensor([2], dtype=torch.int32)
    torch.library.opcheck(rope3d_qk_reference, (x, k, grid, cu, off, 10000.0, [4, 4, 4], False, False))


@pytest.mark.parametrize("backend, tol", [("reference", 0.0), ("torch", 1e-6)])
def test_rope3d_compiled_matches_eager(backend, tol):
    """Catches a backend that breaks the graph when traced (the torch backend's cached table and
    complex multiply are eager-only: compiled, it builds the table in the graph, real formula)."""
    grid, cu = torch.tensor([[1, 2, 3], [1, 1, 4]], dtype=torch.int32), packed_cu([6, 4])
    q, k = torch.randn(10, 2, 24), torch.randn(10, 2, 24)
    fn = lambda a, b: ops.rope3d_qk(a, b, grid, cu, backend=backend)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # the trace; inductor is the GPU tests'
    for got, want in zip(compiled(q, k), fn(q, k)):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def _bad(**changes):
    args = dict(
        x=torch.randn(10, 2, 12),
        grid_thw=torch.tensor([[1, 2, 3], [1, 2, 2]], dtype=torch.int32),
        cu_seqlens=packed_cu([6, 4]),
    )
    kwargs = {}
    for key, value in changes.items():
        (args if key in args else kwargs)[key] = value
    return ops.rope3d(args.pop("x"), **args, **kwargs)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(cu_seqlens=packed_cu([6, 4]).long()), TypeError, "cu_seqlens must have dtype"),
        (dict(cu_seqlens=torch.tensor([0, 7, 6], dtype=torch.int32)), ValueError, "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([1, 6, 10], dtype=torch.int32)), ValueError, r"cu_seqlens\[0\] must be 0"),
        (dict(cu_seqlens=torch.tensor([0, 6, 9], dtype=torch.int32)), ValueError, "must equal the number of packed"),
        (dict(cu_seqlens=None), ValueError, "cu_seqlens .* is required"),
        (dict(grid_thw=torch.tensor([[1, 2, 3]], dtype=torch.int32)), ValueError, "grid_thw must have shape"),
        (dict(grid_thw=torch.tensor([[1, 0, 3], [1, 2, 2]], dtype=torch.int32)), ValueError, r"grid_thw\[0\]"),
        (dict(grid_thw=torch.tensor([[1, 2, 3], [1, 2, 2]], dtype=torch.float32)), TypeError, "grid_thw must have"),
        (dict(x=torch.randn(10, 2, 13)), ValueError, "head_dim must be even"),
        (dict(x=torch.randint(0, 5, (10, 2, 12))), TypeError, "x must have dtype"),
        (dict(x=torch.randn(10, 12)), ValueError, "x must have 3 or 4 dims"),
        (dict(axes_dim=(4, 4, 2)), ValueError, "must sum to head_dim"),
        (dict(axes_dim=(3, 5, 4)), ValueError, "three even"),
        (dict(token_offset=torch.tensor([0, -1], dtype=torch.int32)), ValueError, "token_offset must be >= 0"),
        (dict(token_offset=torch.tensor([0], dtype=torch.int32)), ValueError, "token_offset must have shape"),
        (dict(theta=-1.0), ValueError, "theta must be a positive"),
        # t*h*w past int64 (it wrapped to 0: ZeroDivisionError on the reference, garbage on triton)
        (dict(grid_thw=torch.tensor([[2**21, 2**21, 2**21], [1, 2, 2]])), ValueError, r"grid_thw\[0\] .* t\*h\*w"),
        (dict(grid_thw=torch.tensor([[1, 2, 3], [1, 65536, 32768]])), ValueError, r"grid_thw\[1\] .* more than"),
        (dict(token_offset=torch.tensor([0, 2**62])), ValueError, "token_offset must be <="),
        (dict(cu_seqlens=packed_cu([6, 4], device="meta")), ValueError, "cu_seqlens is on meta"),
    ],
)
@pytest.mark.bad_input
def test_rope3d_bad_input(changes, error, match):
    with pytest.raises(error, match=match):
        _bad(**changes)


@pytest.mark.bad_input
def test_rope3d_dense_with_cu_seqlens_is_rejected():
    with pytest.raises(ValueError, match="cu_seqlens must be None"):
        ops.rope3d(torch.randn(2, 6, 2, 12), torch.tensor([[1, 2, 3]] * 2, dtype=torch.int32), packed_cu([6, 6]))


@pytest.mark.bad_input
def test_rope3d_qk_bad_k():
    grid, cu = torch.tensor([[1, 2, 3]], dtype=torch.int32), packed_cu([6])
    with pytest.raises(ValueError, match="k .* must match q"):
        ops.rope3d_qk(torch.randn(6, 2, 12), torch.randn(5, 2, 12), grid, cu)
    with pytest.raises(TypeError, match="q and k must share one dtype"):
        ops.rope3d_qk(torch.randn(6, 2, 12), torch.randn(6, 2, 12).half(), grid, cu)


def test_rope3d_angle_precision_is_float64():
    # At position 1000 on the t axis, float32 angles would be off by ~1e-4 rad; float64 is exact.
    grid, cu = torch.tensor([[1001, 1, 1]], dtype=torch.int32), packed_cu([1])
    x = torch.randn(1, 1, 12, dtype=torch.float64)
    out = ops.rope3d(x, grid, cu, token_offset=torch.tensor([1000], dtype=torch.int32))
    expect = rope_oracle(x, [(1001, 1, 1)], [1], offsets=[1000])
    torch.testing.assert_close(out, expect, atol=1e-12, rtol=1e-12)
    assert math.isclose(out.norm().item(), x.norm().item(), rel_tol=1e-12)


@pytest.mark.gpu
def test_rope3d_cuda_bf16_real_shape_and_compile():
    # 21 x 30 x 52 = 32760 tokens (480x832, 81 frames) plus a 720p image, Wan's head_dim 128.
    grids, lengths = [(21, 30, 52), (1, 45, 80)], [32760, 3600]
    x = torch.randn(sum(lengths), 12, 128).bfloat16()
    grid, cu = torch.tensor(grids, dtype=torch.int32), packed_cu(lengths)
    expect = ops.rope3d(x.double(), grid, cu)
    out = ops.rope3d(x.cuda(), grid.cuda(), cu.cuda())
    assert out.dtype == torch.bfloat16
    err = ((out.cpu().double() - expect).norm() / expect.norm()).item()
    assert err < 4e-3  # bf16 output rounding (2^-9) only
    compiled = torch.compile(lambda a: ops.rope3d(a, grid.cuda(), cu.cuda()), fullgraph=True)
    torch.testing.assert_close(compiled(x.cuda()), out, atol=0, rtol=0)

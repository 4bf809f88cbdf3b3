"""ops.rotary / rotary_qk / rotary_tables: rotation from cos / sin tables on every backend, against
a float64 oracle written here (not fastdit.reference), forward and backward, at input scales
1e-3, 1 and 1e3, with NaN / inf, and every bad input named."""

import pytest
import torch

from fastdit import ops
from tests.conftest import CPU_BACKENDS, TRITON_ON_CPU, rel_err

BACKENDS = [b if b != "triton" else pytest.param("triton", marks=pytest.mark.triton_cpu) for b in CPU_BACKENDS]


def oracle(x, cos, sin, interleaved, conjugate=False):
    """float64 complex multiply of each pair: x (N, H, D), cos / sin broadcast to (N, H, P)."""
    x, cos, sin = x.double(), cos.double(), sin.double()
    pairs = cos.shape[-1]
    if interleaved:
        idx_a = torch.arange(pairs) * 2
        idx_b = idx_a + 1
    else:
        idx_a = torch.arange(pairs)
        idx_b = idx_a + pairs
    z = torch.complex(x[..., idx_a], x[..., idx_b]) * torch.complex(cos, -sin if conjugate else sin)
    out = x.clone()
    out[..., idx_a], out[..., idx_b] = z.real, z.imag
    return out


def _angles(rows, heads, pairs, seed=0):
    angle = torch.rand(rows, heads, pairs, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 6
    return angle.cos().float(), angle.sin().float()


LAYOUTS = [  # (x shape, table rows (dense: S shared, or B*S), table heads, pairs)
    ((2, 6, 3, 16), 6, 1, 8),  # dense, one table for every sample and head
    ((2, 6, 3, 16), 12, 3, 8),  # dense, a row per token, a table per head (Mochi)
    ((11, 4, 24), 11, 1, 6),  # packed, only the first 12 of 24 features rotate
    ((5, 2, 10), 5, 2, 5),  # packed, odd pair count
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_rotary_matches_float64_oracle(backend, interleaved, layout, scale, poison_outputs):
    """Catches the two pairings swapped, a table row taken for the wrong token (dense tables
    shared by samples, per-head tables), the pass-through features dropped or unwritten
    (poisoned outputs), and the sign of sin flipped."""
    shape, rows, heads, pairs = layout
    x = torch.randn(shape) * scale
    cos, sin = _angles(rows, heads, pairs)
    out = ops.rotary(x, cos, sin, interleaved=interleaved, backend=backend)
    flat = x.reshape(-1, *shape[-2:])
    tokens = flat.shape[0]
    want = oracle(flat, cos.repeat(tokens // rows, 1, 1), sin.repeat(tokens // rows, 1, 1), interleaved)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out.reshape(flat.shape), want) <= 1e-6


DTYPE_CASES = [
    *(pytest.param(b, torch.float16, marks=pytest.mark.triton_cpu) if b == "triton" else (b, torch.float16)
      for b in CPU_BACKENDS),
    *((b, torch.float64) for b in ("reference", "torch")),
]  # fmt: skip


@pytest.mark.parametrize("backend, dtype", DTYPE_CASES)  # the triton backend takes fp16 / bf16 / fp32
def test_rotary_dtypes_round_once(backend, dtype):
    """fp16 rounds once at the end (math in float32: error within fp16's half ulp); fp64 stays
    fp64 (catches a silent float32 pass). Catches a result cast before the rotation."""
    x = torch.randn(7, 2, 8, dtype=dtype)
    cos, sin = _angles(7, 1, 4)
    if dtype == torch.float64:
        angle = torch.rand(7, 1, 4, dtype=torch.float64)
        cos, sin = angle.cos(), angle.sin()
    out = ops.rotary(x, cos, sin, backend=backend)
    want = oracle(x, cos, sin, True)
    assert rel_err(out, want) <= (4e-4 if dtype == torch.float16 else 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_backward_is_the_conjugate_rotation(backend, interleaved):
    """Catches a backward that rotates forward again (the gradient of a rotation is its inverse)
    or drops the pass-through features' gradient."""
    x = torch.randn(2, 5, 3, 12, requires_grad=True)
    cos, sin = _angles(5, 1, 5)
    grad = torch.randn(2, 5, 3, 12)
    (got,) = torch.autograd.grad(ops.rotary(x, cos, sin, interleaved=interleaved, backend=backend), x, grad)
    flat = grad.reshape(10, 3, 12)
    want = oracle(flat, cos.repeat(2, 1, 1), sin.repeat(2, 1, 1), interleaved, conjugate=True)
    assert rel_err(got.reshape(flat.shape), want) <= 1e-6
    back = ops.rotary(ops.rotary(x, cos, sin, backend=backend), cos, sin, conjugate=True, backend=backend)
    assert rel_err(back, x) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_nan_and_inf_stay_in_their_pair(backend):
    """A NaN in x spoils its own pair only; a NaN angle spoils that token's rotated features and
    not its pass-through ones; inf in x gives inf / NaN exactly where the oracle does. Catches a
    kernel reading a neighbour pair, or a table row shared across tokens."""
    x = torch.randn(4, 2, 8)
    x[1, 0, 2] = float("nan")
    x[2, 1, 7] = float("inf")
    cos, sin = _angles(4, 1, 3)
    cos[3, 0, 1] = float("nan")
    out = ops.rotary(x, cos, sin, backend=backend)
    want = oracle(x, cos, sin, True)
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
    assert out[1, 0, 2:4].isnan().all() and not out[1, 0, :2].isnan().any() and not out[1, 1].isnan().any()
    assert out[3, :, 2:4].isnan().all() and not out[3, :, 6:].isnan().any()
    finite = want.isfinite()
    assert rel_err(out[finite], want[finite]) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_takes_strided_and_offset_views(backend, poison_outputs):
    """x as q of a fused (N, 3, H, D) qkv (offset, token stride 3HD), and as every other feature
    of a wider row (last-dim stride 2); tables as strided views (every other pair of a wider
    table, as a repeat-interleaved family table is read). Catches a kernel indexing x or the
    tables as if contiguous."""
    qkv = torch.randn(9, 3, 2, 12)
    wide = torch.randn(9, 2, 24)
    angle = torch.rand(9, 1, 12, dtype=torch.float64) * 6
    cos, sin = angle.cos().float()[..., ::2], angle.sin().float()[..., ::2]  # (9, 1, 6), last-dim stride 2
    for x in (qkv[:, 1], wide[..., ::2]):
        assert not x.is_contiguous()
        for interleaved in (True, False):
            out = ops.rotary(x, cos, sin, interleaved=interleaved, backend=backend)
            assert rel_err(out, oracle(x, cos, sin, interleaved)) <= 1e-6


def test_rotary_qk_rotates_both_with_one_table():
    """Catches k rotated with q's table shape assumptions (GQA: fewer k heads, a shared table)."""
    q, k = torch.randn(6, 4, 8), torch.randn(6, 1, 8)
    cos, sin = _angles(6, 1, 4)
    got_q, got_k = ops.rotary_qk(q, k, cos, sin, interleaved=False)
    assert rel_err(got_q, oracle(q, cos, sin, False)) <= 1e-6 and rel_err(got_k, oracle(k, cos, sin, False)) <= 1e-6


def test_rotary_tables_per_axis_theta_fractional_positions_and_given_freqs():
    """Catches the axes' pair blocks in the wrong order, one theta used for every axis, a
    fractional position truncated, or given frequencies ignored."""
    positions = torch.tensor([[0.0, 1.5, 2.0], [3.0, 0.25, 7.0]])
    cos, sin = ops.rotary_tables(positions, [4, 2, 6], theta=[10000.0, 256.0, 1e6], dtype=torch.float64)
    assert cos.shape == (2, 6)
    want = []
    for axis, (dim, theta) in enumerate(zip([4, 2, 6], [10000.0, 256.0, 1e6])):
        for j in range(dim // 2):
            want.append(positions[:, axis].double() * theta ** (-2 * j / dim))
    angle = torch.stack(want, dim=-1)
    assert torch.allclose(cos, angle.cos(), rtol=0, atol=1e-15) and torch.allclose(sin, angle.sin(), atol=1e-15)
    freqs = [torch.tensor([0.5, 2.0]), torch.tensor([3.0]), torch.tensor([1.0, 1.0, 0.1])]
    cos, sin = ops.rotary_tables(positions, [4, 2, 6], freqs=freqs, dtype=torch.float64)
    assert torch.allclose(sin[1], torch.tensor([1.5, 6.0, 0.75, 7.0, 7.0, 0.7], dtype=torch.float64).sin(), atol=1e-15)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs the Triton interpreter")
def test_rotary_triton_equals_torch_to_the_last_bit_in_fp32():
    """Same float32 formula: catches an FMA or an order of operations that differs between them."""
    x = torch.randn(9, 3, 16)
    cos, sin = _angles(9, 3, 8)
    assert torch.equal(ops.rotary(x, cos, sin, backend="triton"), ops.rotary(x, cos, sin, backend="torch"))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda x, c: (x, c, c[:-1]), ValueError, "one shape"),
        (lambda x, c: (x, torch.randn(5, 1, 9), torch.randn(5, 1, 9)), ValueError, "more than head_dim"),
        (lambda x, c: (x, torch.randn(5, 3, 4), torch.randn(5, 3, 4)), ValueError, "expected 1 \\(shared\\)"),
        (lambda x, c: (x, torch.randn(4, 1, 4), torch.randn(4, 1, 4)), ValueError, "4 rows"),
        (lambda x, c: (x, torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4)), ValueError, "4-dim cos / sin"),
        (lambda x, c: (x, c.int(), c.int()), TypeError, "cos must have dtype"),
        (lambda x, c: (x, c.to("meta"), c.to("meta")), ValueError, "on meta"),
        (lambda x, c: (x, c.clone().requires_grad_(), c), ValueError, "no gradient for cos / sin"),
        (lambda x, c: (x[0], c, c), ValueError, "must have 3 or 4 dims"),
        (lambda x, c: (x, c.tolist(), c), TypeError, "must be a torch.Tensor"),
    ],
)
def test_rotary_bad_inputs_are_named(make, error, message):
    """Catches a table silently broadcast over the wrong rows or heads, a rotation longer than
    the head, or a learned table that would get no gradient without a word."""
    x, cos = torch.randn(5, 2, 8), torch.randn(5, 1, 4)
    args = make(x, cos)
    with pytest.raises(error, match=message):
        ops.rotary(*args)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"axes_dim": [4, 3]}, "even non-negative"),
        ({"axes_dim": [4]}, "2 axes"),
        ({"axes_dim": [4, 2], "theta": [1.0]}, "one per axis"),
        ({"axes_dim": [4, 2], "freqs": [torch.ones(2), torch.ones(2)]}, "axes_dim\\[a\\] / 2"),
    ],
)
def test_rotary_tables_bad_inputs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.rotary_tables(torch.zeros(3, 2), **kwargs)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_rotary_custom_ops_pass_opcheck(backend):
    """Schema, fake tensor and autograd registration of the custom ops (catches a fake whose
    strides differ from the real output, which torch.compile would trust)."""
    import importlib

    module = importlib.import_module("fastdit.ops.rotary")  # fastdit.ops.rotary is also the function

    op = {"reference": module.rotary_reference, "triton": getattr(module, "rotary_triton", None)}[backend]
    if backend == "triton" and not TRITON_ON_CPU:
        pytest.skip("needs the Triton interpreter")
    cos, sin = _angles(6, 1, 4)
    x = torch.randn(6, 2, 10, requires_grad=True)
    torch.library.opcheck(op, (x, cos, sin, True, False), test_utils=("test_schema", "test_autograd_registration",
                                                                      "test_faketensor"))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_triton_cuda_bf16_real_shape(interleaved):
    """HunyuanVideo's self-attention at 720p-class length (32760 tokens, 24 heads x 128) in bf16:
    within one bf16 rounding of the float64 oracle, and the torch backend's float32 formula to
    within one bf16 ulp. Catches a kernel that runs on CPU but mis-indexes at real strides."""
    x = torch.randn(32760, 24, 128, device="cuda", dtype=torch.bfloat16)
    angle = torch.rand(32760, 1, 64, device="cuda", dtype=torch.float64) * 100
    cos, sin = angle.cos().float(), angle.sin().float()
    out = ops.rotary(x, cos, sin, interleaved=interleaved, backend="triton")
    want = oracle(x, cos, sin, interleaved)
    assert rel_err(out, want) <= 2**-8
    torch.testing.assert_close(out, ops.rotary(x, cos, sin, interleaved=interleaved, backend="torch"), atol=0,
                               rtol=2**-7)  # fmt: skip

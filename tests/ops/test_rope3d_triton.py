"""The triton backend of rope3d / rope3d_qk (CPU: under TRITON_INTERPRET=1; GPU: -m gpu)."""

import pytest
import torch
import torch.nn.functional as F

from fastdit import ops
from tests.conftest import CPU_BACKENDS, packed_cu
from tests.ops.test_rope3d import CASES, rope_oracle
from tests.ops.tolerances import rope_tolerance

# CPU tests run the kernels under TRITON_INTERPRET=1; -m gpu tests run them on CUDA.
pytestmark = [
    pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not installed"),
    pytest.mark.triton_cpu,
]
TOL = {torch.float32: 2e-6, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_oracle_and_reference(dtype, head_dim, case, poison_outputs):
    grids, lengths = case
    x = torch.randn(sum(lengths), 3, head_dim).to(dtype)
    grid, cu = torch.tensor(grids, dtype=torch.int32), packed_cu(lengths)
    out = ops.rope3d(x, grid, cu, backend="triton")
    torch.testing.assert_close(out.double(), rope_oracle(x, grids, lengths), atol=TOL[dtype] * 4, rtol=TOL[dtype])
    # Same float64 angles, same float32 rotation: the reference to the last bit.
    torch.testing.assert_close(out, ops.rope3d(x, grid, cu, backend="reference"), atol=0, rtol=0)


@pytest.mark.parametrize("interleaved", [True, False])
def test_triton_qk_layouts_offsets_theta_gqa(interleaved, poison_outputs):
    grids, lengths, offsets = [(4, 2, 3), (1, 3, 3), (2, 2, 2)], [5, 9, 1], [9, 0, 7]
    q, k = torch.randn(15, 4, 16), torch.randn(15, 1, 16)
    kwargs = dict(theta=256.0, axes_dim=(4, 6, 6), interleaved=interleaved)
    kwargs["token_offset"] = torch.tensor(offsets, dtype=torch.int32)
    grid, cu = torch.tensor(grids, dtype=torch.int32), packed_cu(lengths)
    out_q, out_k = ops.rope3d_qk(q, k, grid, cu, backend="triton", **kwargs)
    expect_args = dict(theta=256.0, axes=(4, 6, 6), interleaved=interleaved, offsets=offsets)
    torch.testing.assert_close(out_q.double(), rope_oracle(q, grids, lengths, **expect_args), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_k.double(), rope_oracle(k, grids, lengths, **expect_args), atol=1e-5, rtol=1e-5)


def test_triton_dense_equals_packed_and_strided_input():
    x = torch.randn(2, 12, 2, 32)
    grid = torch.tensor([[1, 3, 4], [2, 2, 3]], dtype=torch.int32)
    dense = ops.rope3d(x, grid, backend="triton")
    packed = ops.rope3d(x.reshape(24, 2, 32), grid, packed_cu([12, 12]), backend="triton")
    torch.testing.assert_close(dense.reshape(24, 2, 32), packed, atol=0, rtol=0)
    # q and k as strided views into one fused qkv projection
    qkv = torch.randn(24, 3, 2, 32)
    q, k = qkv[:, 0], qkv[:, 1]
    out_q, out_k = ops.rope3d_qk(q, k, grid, packed_cu([12, 12]), backend="triton")
    torch.testing.assert_close(out_q, ops.rope3d(q.contiguous(), grid, packed_cu([12, 12])), atol=0, rtol=0)
    torch.testing.assert_close(out_k, ops.rope3d(k.contiguous(), grid, packed_cu([12, 12])), atol=0, rtol=0)


def test_triton_in_place():
    grid, cu = torch.tensor([[2, 2, 3], [1, 1, 1]], dtype=torch.int32), packed_cu([12, 1])
    q, k = torch.randn(13, 2, 64), torch.randn(13, 2, 64)
    expect_q, expect_k = ops.rope3d_qk(q, k, grid, cu, backend="reference")
    q_ptr = q.data_ptr()
    out_q, out_k = ops.rope3d_qk(q, k, grid, cu, backend="triton", inplace=True)
    assert out_q is q and out_k is k and q.data_ptr() == q_ptr
    torch.testing.assert_close(q, expect_q, atol=0, rtol=0)
    torch.testing.assert_close(k, expect_k, atol=0, rtol=0)
    x = torch.randn(13, 3, 32)
    expect = ops.rope3d(x, grid, cu)
    assert ops.rope3d(x, grid, cu, backend="triton", inplace=True) is x
    torch.testing.assert_close(x, expect, atol=0, rtol=0)


def test_triton_backward_matches_float64():
    grids, lengths = [(2, 3, 2), (1, 1, 4)], [12, 4]
    grid, cu = torch.tensor(grids, dtype=torch.int32), packed_cu(lengths)
    q = torch.randn(16, 2, 64, requires_grad=True)
    k = torch.randn(16, 1, 64, requires_grad=True)
    w_q, w_k = torch.randn(16, 2, 64), torch.randn(16, 1, 64)
    out_q, out_k = ops.rope3d_qk(q, k, grid, cu, backend="triton", interleaved=False)
    ((out_q * w_q).sum() + (out_k * w_k).sum()).backward()
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    ref_q, ref_k = ops.rope3d_qk(q64, k64, grid, cu, backend="reference", interleaved=False)
    ((ref_q * w_q.double()).sum() + (ref_k * w_k.double()).sum()).backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.grad.double(), k64.grad, atol=1e-5, rtol=1e-5)


# AOT tracing decomposes a triton_op into its kernel launches, which the interpreter cannot run on
# fake tensors: on CPU that one check is left to the GPU run.
OPCHECK_UTILS = (
    ("test_schema", "test_autograd_registration", "test_faketensor")
    if not torch.cuda.is_available()
    else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
)


def test_triton_opcheck():
    from fastdit.ops.rope3d import rope3d_qk_triton, rope3d_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"

    grid = torch.tensor([[1, 2, 3], [1, 1, 2]], dtype=torch.int32, device=device)
    cu = packed_cu([6, 2], device=device)
    x = torch.randn(8, 2, 16, device=device, requires_grad=True)
    k = torch.randn(8, 1, 16, device=device, requires_grad=True)
    off = torch.tensor([1, 0], dtype=torch.int32, device=device)
    args = (x, grid, cu, None, 10000.0, [4, 6, 6], True, False)
    torch.library.opcheck(rope3d_triton, args, test_utils=OPCHECK_UTILS)
    args = (x, k, grid, cu, off, 10000.0, [4, 6, 6], False, True)
    torch.library.opcheck(rope3d_qk_triton, args, test_utils=OPCHECK_UTILS)


def test_triton_is_not_picked_on_cpu_unless_forced():
    grid, cu = torch.tensor([[1, 2, 3]], dtype=torch.int32), packed_cu([6])
    inputs = {"device": torch.device("cpu"), "dtype": torch.float32, "head_dim": 16, "interleaved": True}
    assert ops.select_backend("rope3d", inputs).name == "torch"  # the cached table and complex multiply
    assert ops.select_backend("rope3d", inputs, backend="triton").name == "triton"
    with pytest.raises(ops.BackendNotSupportedError, match="dtype float64"):
        ops.rope3d(torch.randn(6, 1, 16, dtype=torch.float64), grid, cu, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [12, 24, 40])
def test_triton_cuda_bf16_real_shape_and_compile(heads):
    grids, lengths = [(21, 30, 52), (1, 45, 80), (1, 1, 1)], [32760, 3600, 1]
    grid, cu = torch.tensor(grids, dtype=torch.int32).cuda(), packed_cu(lengths).cuda()
    q = torch.randn(sum(lengths), heads, 128, device="cuda").bfloat16()
    k = torch.randn_like(q)
    out_q, out_k = ops.rope3d_qk(q, k, grid, cu)  # the dispatcher picks triton on CUDA
    ref_q, ref_k = ops.rope3d_qk(q, k, grid, cu, backend="reference")
    # Same float64 angles and float32 math up to FMA contraction (tests/ops/tolerances.py).
    torch.testing.assert_close(out_q, ref_q, **rope_tolerance(q))
    torch.testing.assert_close(out_k, ref_k, **rope_tolerance(k))
    compiled = torch.compile(lambda a, b: ops.rope3d_qk(a, b, grid, cu, backend="triton"), fullgraph=True)
    for got, want in zip(compiled(q, k), (out_q, out_k)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def _qk_norm_inputs(dtype=torch.float32, heads=3, kv_heads=1, head_dim=64):
    grids, lengths = [(2, 3, 2), (1, 1, 1), (1, 2, 8)], [12, 1, 18]  # 2 unrotated tokens in the last
    q = torch.randn(sum(lengths), heads, head_dim).to(dtype)
    k = torch.randn(sum(lengths), kv_heads, head_dim).to(dtype)
    q_w, k_w = torch.randn(heads * head_dim), torch.randn(kv_heads * head_dim)
    return q, k, q_w, k_w, grids, lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved", [True, False])
def test_fused_qk_norm_matches_oracle(dtype, interleaved, poison_outputs):
    q, k, q_w, k_w, grids, lengths = _qk_norm_inputs(dtype)
    grid, cu = torch.tensor(grids, dtype=torch.int32), packed_cu(lengths)
    kwargs = dict(interleaved=interleaved, q_norm_weight=q_w, k_norm_weight=k_w, norm_eps=1e-5)
    got = ops.rope3d_qk(q, k, grid, cu, backend="triton", **kwargs)
    ref = ops.rope3d_qk(q, k, grid, cu, backend="reference", **kwargs)
    for x, w, out, want in ((q, q_w, got[0], ref[0]), (k, k_w, got[1], ref[1])):
        normed = F.rms_norm(x.double().flatten(1), (w.numel(),), w.double(), 1e-5).to(dtype).view(x.shape)
        oracle = rope_oracle(normed, grids, lengths, interleaved=interleaved)
        torch.testing.assert_close(want.double(), oracle, atol=TOL[dtype] * 8, rtol=TOL[dtype] * 2)
        torch.testing.assert_close(out.double(), oracle, atol=TOL[dtype] * 8, rtol=TOL[dtype] * 2)


def test_fused_qk_norm_backward_matches_float64():
    q, k, q_w, k_w, grids, lengths = _qk_norm_inputs()
    grid, cu = torch.tensor(grids, dtype=torch.int32), packed_cu(lengths)
    leaves = [t.clone().requires_grad_() for t in (q, k, q_w, k_w)]
    w1, w2 = torch.randn_like(q, dtype=torch.float64), torch.randn_like(k, dtype=torch.float64)

    def grads(backend, tensors):
        a, b = ops.rope3d_qk(tensors[0], tensors[1], grid, cu, q_norm_weight=tensors[2], k_norm_weight=tensors[3],
                             backend=backend)  # fmt: skip
        return torch.autograd.grad((a.double() * w1).sum() + (b.double() * w2).sum(), tensors)

    doubles = [t.detach().double().requires_grad_() for t in leaves]
    for got, want in zip(grads("triton", leaves), grads("reference", doubles)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.bad_input
def test_fused_qk_norm_bad_input_and_opcheck():
    from fastdit.ops.rope3d import rope3d_qk_norm_triton

    q, k, q_w, k_w, grids, lengths = _qk_norm_inputs()
    grid, cu = torch.tensor(grids, dtype=torch.int32), packed_cu(lengths)
    with pytest.raises(ValueError, match="pass both or neither"):
        ops.rope3d_qk(q, k, grid, cu, q_norm_weight=q_w)
    with pytest.raises(ValueError, match=r"k_norm_weight must have shape \(H \* D,\) = \(64,\)"):
        ops.rope3d_qk(q, k, grid, cu, q_norm_weight=q_w, k_norm_weight=q_w)
    args = (q.requires_grad_(), k.requires_grad_(), q_w, k_w, 1e-6, grid, cu, None, 1e4, [24, 20, 20], True)
    torch.library.opcheck(rope3d_qk_norm_triton, args, test_utils=OPCHECK_UTILS)


@pytest.mark.gpu
def test_fused_qk_norm_cuda_bf16_real_shape_and_compile():
    grids, lengths = [(21, 30, 52), (1, 45, 80)], [32760, 3600]
    grid, cu = torch.tensor(grids, dtype=torch.int32).cuda(), packed_cu(lengths).cuda()
    q = torch.randn(sum(lengths), 12, 128, device="cuda").bfloat16()
    k = torch.randn_like(q)
    q_w, k_w = torch.randn(1536, device="cuda"), torch.randn(1536, device="cuda")
    kwargs = dict(q_norm_weight=q_w, k_norm_weight=k_w)
    got = ops.rope3d_qk(q, k, grid, cu, **kwargs)  # the dispatcher picks triton on CUDA
    ref = ops.rope3d_qk(q, k, grid, cu, backend="reference", **kwargs)
    for a, b in zip(got, ref):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 4e-3
    compiled = torch.compile(lambda a, b: ops.rope3d_qk(a, b, grid, cu, **kwargs), fullgraph=True)
    for a, b in zip(compiled(q, k), got):
        torch.testing.assert_close(a, b, atol=0, rtol=0)

"""The cuda backends' own kernel source (csrc/*.cu) run on the CPU through csrc/cuda_emulation.h.

No GPU has run these kernels yet; here their indexing, packed-batch lookup, vector / scalar path
choice, 16-byte alignment (the emulator reports any misaligned vector access), block reductions
and rounding are checked against the reference ops, through the same Python wrappers, fakes and
autograd registrations the GPU uses. Outputs start as NaN (deterministic mode fills fresh
tensors), so an element a kernel never writes fails. Speed, coalescing and inter-block races are
the GPU tests' job (tests/ops/test_cuda_backends.py).
"""

import pytest
import torch

from fastdit.ops.adaln_modulate import _adaln_modulate_cuda, adaln_modulate_reference
from fastdit.ops.gated_residual import _gated_residual_cuda, gated_residual_reference
from fastdit.ops.rope3d import rope3d_qk_reference, rope3d_reference
from fastdit.reference.rope3d import wan_axes_dim
from tests import cuda_emulation
from tests.conftest import packed_cu, rel_err

pytestmark = pytest.mark.skipif(cuda_emulation.unavailable() is not None, reason=str(cuda_emulation.unavailable()))

# A video with 3 padding tokens past t*h*w, a single-token image, a small video.
GRIDS, LENGTHS = [(3, 4, 5), (1, 1, 1), (2, 3, 4)], [63, 1, 24]
FP_TOL = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 4e-3}


@pytest.fixture(autouse=True)
def emulated_cuda_ops():
    cuda_emulation.load()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # with fill_uninitialized_memory: new tensors are NaN
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(deterministic)


def _rope_inputs(heads, kv_heads, head_dim, dtype):
    total = sum(LENGTHS)
    q = torch.randn(total, heads, head_dim).to(dtype)
    k = torch.randn(total, kv_heads, head_dim).to(dtype)
    return q, k, torch.tensor(GRIDS, dtype=torch.int32), packed_cu(LENGTHS)


def _axes(head_dim):
    return list(wan_axes_dim(head_dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [20, 64, 72, 96, 128])  # 20: no 16-byte chunk fits, the scalar path
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope3d_kernels_match_the_reference(dtype, head_dim, interleaved):
    q, k, grid, cu = _rope_inputs(3, 2, head_dim, dtype)
    offset = torch.tensor([0, 5, 2], dtype=torch.int32)
    args = (grid, cu, offset, 1e4, _axes(head_dim), interleaved)
    got = torch.ops.fastdit.rope3d_qk_cuda(q, k, *args, False)
    want = rope3d_qk_reference(q, k, *args, False)
    for a, b in zip(got, want):  # the same float64 angles; fp32 rotation (one ulp apart at most)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=torch.finfo(dtype).eps)
    torch.testing.assert_close(torch.ops.fastdit.rope3d_cuda(q, *args, False), got[0], atol=0, rtol=0)
    back = torch.ops.fastdit.rope3d_qk_cuda(*got, *args, True)  # the conjugate undoes the rotation
    eps = torch.finfo(dtype).eps
    for a, b in zip(back, (q, k)):
        torch.testing.assert_close(a.float(), b.float(), atol=4 * eps, rtol=4 * eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope3d_in_place_stays_inside_its_rows(dtype):
    """In place on views inside NaN guard rows: nothing outside the tensor is read or written."""
    q, k, grid, cu = _rope_inputs(4, 4, 64, dtype)
    args = (grid, cu, None, 1e4, _axes(64), False, False)
    want_q, want_k = rope3d_qk_reference(q, k, *args)
    total = q.shape[0]
    guarded = torch.full((total + 2, 4, 64), float("nan"), dtype=dtype)
    guarded_k = guarded.clone()
    q2, k2 = guarded[1:-1], guarded_k[1:-1]
    q2.copy_(q)
    k2.copy_(k)
    torch.ops.fastdit.rope3d_qk_inplace_cuda(q2, k2, *args)
    torch.testing.assert_close(q2, want_q, atol=1e-6, rtol=torch.finfo(dtype).eps)
    torch.testing.assert_close(k2, want_k, atol=1e-6, rtol=torch.finfo(dtype).eps)
    for buf in (guarded, guarded_k):
        assert buf[0].isnan().all() and buf[-1].isnan().all()
    x = q.clone()
    torch.ops.fastdit.rope3d_inplace_cuda(x, *args)
    torch.testing.assert_close(x, want_q, atol=1e-6, rtol=torch.finfo(dtype).eps)


def test_rope3d_strided_and_misaligned_views():
    """Views of a fused projection (16-byte aligned rows: the vector path) and views shifted by
    one element (rows misaligned: the launcher must pick the scalar path, or the emulator
    reports a misaligned access)."""
    q, k, grid, cu = _rope_inputs(4, 4, 64, torch.float16)
    args = (grid, cu, None, 1e4, _axes(64), False, False)
    want_q, want_k = rope3d_qk_reference(q, k, *args)
    qkv = torch.stack([q, k, k], dim=1)
    got_q, got_k = torch.ops.fastdit.rope3d_qk_cuda(qkv[:, 0], qkv[:, 1], *args)
    torch.testing.assert_close(got_q, want_q, atol=1e-6, rtol=2**-10)
    torch.testing.assert_close(got_k, want_k, atol=1e-6, rtol=2**-10)
    flat = torch.empty(q.numel() + 1, dtype=q.dtype)
    shifted = flat[1:].view(q.shape)  # data pointer 2 bytes past a 16-byte boundary
    shifted.copy_(q)
    torch.testing.assert_close(torch.ops.fastdit.rope3d_cuda(shifted, *args), want_q, atol=1e-6, rtol=2**-10)
    torch.ops.fastdit.rope3d_inplace_cuda(shifted, *args)
    torch.testing.assert_close(shifted, want_q, atol=1e-6, rtol=2**-10)


def test_rope3d_autograd_and_opcheck():
    """The registered backward (the conjugate rotation, on the cuda op) and fake functions."""
    q, _, grid, cu = _rope_inputs(2, 2, 16, torch.float32)
    x = q.double().float().requires_grad_()
    w = torch.randn_like(x)
    args = (grid, cu, None, 1e4, [4, 6, 6], False, False)
    (grad,) = torch.autograd.grad((torch.ops.fastdit.rope3d_cuda(x, *args) * w).sum(), x)
    (want,) = torch.autograd.grad((rope3d_reference(x, *args) * w).sum(), x)
    torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-6)
    small = torch.randn(8, 2, 16, requires_grad=True)
    op_args = (torch.tensor([[1, 2, 4]], dtype=torch.int32), packed_cu([8]), None, 1e4, [4, 6, 6])
    torch.library.opcheck(torch.ops.fastdit.rope3d_cuda.default, (small, *op_args, True, False))
    pair = (small, torch.randn(8, 1, 16, requires_grad=True))
    torch.library.opcheck(torch.ops.fastdit.rope3d_qk_cuda.default, (*pair, *op_args, False, False))


@pytest.mark.bad_input
def test_rope3d_kernel_rejects_bad_input():
    q, k, grid, cu = _rope_inputs(2, 2, 64, torch.float32)
    args = (grid, cu, None, 1e4)
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        torch.ops.fastdit.rope3d_cuda(torch.randn(88, 2, 63), *args, [21, 21, 21], False, False)
    with pytest.raises(RuntimeError, match="axes_dim"):
        torch.ops.fastdit.rope3d_cuda(q, *args, [20, 20, 20], False, False)
    with pytest.raises(RuntimeError, match="k must match q"):
        torch.ops.fastdit.rope3d_qk_cuda(q, k.half(), *args, _axes(64), False, False)
    with pytest.raises(RuntimeError, match="cu_seqlens must be an int32"):
        torch.ops.fastdit.rope3d_cuda(q, grid, cu.long(), None, 1e4, _axes(64), False, False)


# ---- adaln_modulate: one block of 256 threads per row, warp-shuffle reductions ---------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [73, 1000, 3072])  # scalar path; vectors (1 item); 2 items per thread
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_adaln_modulate_kernel_matches_the_reference(dtype, channels, norm):
    lengths = [9, 1, 12]
    cu = packed_cu(lengths)
    x = (torch.randn(sum(lengths), channels) * 3 + 1).to(dtype)
    shift, scale = torch.randn(3, channels), torch.randn(3, channels)
    weight = torch.randn(channels)
    bias = torch.randn(channels) if norm == "layer" else None
    tol = FP_TOL[dtype]
    for affine in ((None, None), (weight, bias)):
        got = _adaln_modulate_cuda(x, shift, scale, cu, norm, 1e-6, *affine)
        want = adaln_modulate_reference(x, shift, scale, cu, norm, 1e-6, *affine)
        assert got.dtype == dtype and rel_err(got, want) < tol
    per_token = torch.randn(sum(lengths), channels)
    got = _adaln_modulate_cuda(x, per_token, -per_token, None, norm, 1e-6, None, None)
    want = adaln_modulate_reference(x, per_token, -per_token, None, norm, 1e-6, None, None)
    assert rel_err(got, want) < tol


def test_adaln_modulate_widest_rows_and_misaligned_rows():
    """16384 fp16 channels: 8 vectors per thread (the kernel's limit); one more channel is
    refused with the limit in the message. Rows shifted by one element: the scalar path."""
    cu = packed_cu([2, 1])
    x = torch.randn(3, 16384).half()
    shift, scale = torch.randn(2, 16384), torch.randn(2, 16384)
    got = _adaln_modulate_cuda(x, shift, scale, cu, "layer", 1e-6, None, None)
    assert rel_err(got, adaln_modulate_reference(x, shift, scale, cu, "layer", 1e-6, None, None)) < 4e-3
    with pytest.raises(RuntimeError, match="exceeds 16384"):
        _adaln_modulate_cuda(torch.randn(3, 16392).half(), *(torch.randn(2, 16392) for _ in range(2)), cu, "layer",
                             1e-6, None, None)  # fmt: skip
    flat = torch.empty(3 * 1024 + 1)
    rows = flat[1:].view(3, 1024)
    rows.copy_(torch.randn(3, 1024))
    mods = torch.randn(2, 1024), torch.randn(2, 1024)
    got = _adaln_modulate_cuda(rows, *mods, cu, "rms", 1e-6, None, None)
    assert rel_err(got, adaln_modulate_reference(rows, *mods, cu, "rms", 1e-6, None, None)) < 1e-6


def test_adaln_modulate_modulation_rows_off_16_bytes():
    """shift / scale / weight / bias as views that start 4 bytes past a 16-byte boundary: the op
    copies them for the kernel's 16-byte loads (the emulator reports a misaligned access otherwise)."""
    cu = packed_cu([3, 2])
    x = torch.randn(5, 1024).half()
    flat = torch.randn(6 * 1024 + 1)
    shift, scale = flat[1 : 1 + 2048].view(2, 1024), flat[1 + 2048 : 1 + 4096].view(2, 1024)
    weight, bias = flat[1 + 4096 : 1 + 5120], flat[1 + 5120 : 1 + 6144]
    assert shift.data_ptr() % 16 == 4
    got = torch.ops.fastdit.adaln_modulate_cuda(x, shift, scale, cu, "layer", 1e-6, weight, bias)
    want = adaln_modulate_reference(x, shift, scale, cu, "layer", 1e-6, weight, bias)
    assert rel_err(got, want) < 4e-3


def test_adaln_modulate_autograd_and_opcheck():
    """The registered backward of the cuda op (the Triton backward kernel under the interpreter,
    or the reference one) and its fake function."""
    cu = packed_cu([2, 3])
    x = torch.randn(5, 64, requires_grad=True)
    mods = [torch.randn(2, 64, requires_grad=True) for _ in range(2)]
    g = torch.randn(5, 64)
    got = torch.autograd.grad(torch.ops.fastdit.adaln_modulate_cuda(x, *mods, cu, "layer", 1e-6, None, None),
                              (x, *mods), g)  # fmt: skip
    want = torch.autograd.grad(adaln_modulate_reference(x, *mods, cu, "layer", 1e-6, None, None), (x, *mods), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Not test_aot_dispatch_dynamic: the backward is the Triton kernel, which the interpreter cannot
    # run on the fake tensors that test traces with (the GPU test runs it).
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    args = (x, *mods, cu, "layer", 1e-6, None, None)
    torch.library.opcheck(torch.ops.fastdit.adaln_modulate_cuda.default, args, test_utils=utils)


# ---- gated_residual -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [77, 1536])  # scalar path; 16-byte vectors
def test_gated_residual_kernel_matches_the_reference(dtype, channels):
    lengths = [40, 1, 30]
    cu = packed_cu(lengths)
    res, y = (torch.randn(sum(lengths), channels).to(dtype) for _ in range(2))
    gate = torch.randn(3, channels)
    got = _gated_residual_cuda(res, y, gate, cu)
    torch.testing.assert_close(got, gated_residual_reference(res, y, gate, cu), atol=0, rtol=0)
    per_token = torch.randn(sum(lengths), channels)
    got = _gated_residual_cuda(res, y, per_token, None)
    torch.testing.assert_close(got, gated_residual_reference(res, y, per_token, None), atol=0, rtol=0)


def test_gated_residual_gate_rows_off_16_bytes():
    """A gate view 4 bytes past a 16-byte boundary: copied for the kernel's 16-byte gate loads."""
    cu = packed_cu([3, 2])
    res, y = (torch.randn(5, 512).bfloat16() for _ in range(2))
    gate = torch.randn(2 * 512 + 1)[1:].view(2, 512)
    assert gate.data_ptr() % 16 == 4
    got = torch.ops.fastdit.gated_residual_cuda(res, y, gate, cu)
    torch.testing.assert_close(got, gated_residual_reference(res, y, gate, cu), atol=0, rtol=0)


@pytest.mark.bad_input
def test_gated_residual_autograd_opcheck_and_bad_input():
    cu = packed_cu([3, 2])
    res, y = (torch.randn(5, 16, requires_grad=True) for _ in range(2))
    gate = torch.randn(2, 16, requires_grad=True)
    g = torch.randn(5, 16)
    got = torch.autograd.grad(torch.ops.fastdit.gated_residual_cuda(res, y, gate, cu), (res, y, gate), g)
    want = torch.autograd.grad(gated_residual_reference(res, y, gate, cu), (res, y, gate), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="differs from res dtype"):
        torch.ops.fastdit.gated_residual_cuda(res.detach(), y.detach().half(), gate.detach(), cu)
    with pytest.raises(RuntimeError, match="expected B \\+ 1 = 2"):
        torch.ops.fastdit.gated_residual_cuda(res.detach(), y.detach(), gate[:1].detach(), cu)
    torch.library.opcheck(torch.ops.fastdit.gated_residual_cuda.default, (res, y, gate, cu))

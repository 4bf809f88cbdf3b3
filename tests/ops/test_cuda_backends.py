"""The cuda backends of rope3d / rope3d_qk / adaln_modulate (csrc/), and int64 offsets of the Triton
kernels. GPU only (-m gpu): they compare against the reference on the same device."""

import pytest
import torch

from fastdit import ops
from fastdit._extension import cuda_extension_missing
from tests.conftest import packed_cu, rel_err
from tests.ops.tolerances import rope_tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or cuda_extension_missing() is not None, reason="needs CUDA and fastdit._C"
    ),
]
GRIDS, LENGTHS = [(21, 30, 52), (1, 45, 80), (1, 1, 1), (2, 3, 4)], [32760, 3600, 1, 30]  # 6 padding tokens


def _rope_inputs(heads, head_dim, dtype, kv_heads=None):
    total = sum(LENGTHS)
    q = torch.randn(total, heads, head_dim, device="cuda").to(dtype)
    k = torch.randn(total, kv_heads or heads, head_dim, device="cuda").to(dtype)
    grid = torch.tensor(GRIDS, dtype=torch.int32, device="cuda")
    return q, k, grid, packed_cu(LENGTHS).cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 72, 96, 128])
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope3d_cuda_matches_reference(dtype, head_dim, interleaved):
    q, k, grid, cu = _rope_inputs(12, head_dim, dtype, kv_heads=4)
    offset = torch.tensor([0, 7, 0, 3], dtype=torch.int32, device="cuda")
    kwargs = dict(interleaved=interleaved, token_offset=offset)
    got = ops.rope3d_qk(q, k, grid, cu, backend="cuda", **kwargs)
    want = ops.rope3d_qk(q, k, grid, cu, backend="reference", **kwargs)
    for a, b, x in zip(got, want, (q, k)):  # same float64 angles; fp32 math up to FMA contraction
        torch.testing.assert_close(a, b, **rope_tolerance(x))
    single = ops.rope3d(q, grid, cu, backend="cuda", **kwargs)
    torch.testing.assert_close(single, got[0], atol=0, rtol=0)


def test_rope3d_cuda_in_place_strided_backward_compile():
    q, k, grid, cu = _rope_inputs(24, 128, torch.bfloat16)
    want_q, want_k = ops.rope3d_qk(q, k, grid, cu, backend="reference")
    q2, k2 = q.clone(), k.clone()
    assert ops.rope3d_qk(q2, k2, grid, cu, backend="cuda", inplace=True)[0] is q2
    torch.testing.assert_close(q2, want_q, **rope_tolerance(q))
    torch.testing.assert_close(k2, want_k, **rope_tolerance(k))
    qkv = torch.stack([q, k, k], dim=1)  # q and k as strided views of a fused projection
    got_q, _ = ops.rope3d_qk(qkv[:, 0], qkv[:, 1], grid, cu, backend="cuda")
    torch.testing.assert_close(got_q, want_q, **rope_tolerance(q))
    x = q.float().requires_grad_()
    w = torch.randn_like(x)
    (grad,) = torch.autograd.grad((ops.rope3d(x, grid, cu, backend="cuda") * w).sum(), x)
    (want,) = torch.autograd.grad((ops.rope3d(x, grid, cu, backend="reference") * w).sum(), x)
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)
    compiled = torch.compile(lambda a, b: ops.rope3d_qk(a, b, grid, cu, backend="cuda"), fullgraph=True)
    for a, b in zip(compiled(q, k), ops.rope3d_qk(q, k, grid, cu, backend="cuda")):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    small = torch.randn(8, 2, 16, device="cuda", requires_grad=True)
    args = (torch.tensor([[1, 2, 4]], dtype=torch.int32, device="cuda"), packed_cu([8]).cuda(), None, 1e4, [4, 6, 6])
    torch.library.opcheck(torch.ops.fastdit.rope3d_cuda.default, (small, *args, True, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("channels", [73, 1536, 3072, 5120])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_adaln_modulate_cuda_matches_reference(dtype, channels, norm):
    total = sum(LENGTHS)
    cu = packed_cu(LENGTHS).cuda()
    x = (torch.randn(total, channels, device="cuda") * 3 + 1).to(dtype)
    shift, scale = torch.randn(4, channels, device="cuda"), torch.randn(4, channels, device="cuda")
    weight = torch.randn(channels, device="cuda")
    bias = torch.randn(channels, device="cuda") if norm == "layer" else None
    for kwargs in (dict(), dict(weight=weight, bias=bias)):
        got = ops.adaln_modulate(x, shift, scale, cu, norm=norm, backend="cuda", **kwargs)
        want = ops.adaln_modulate(x, shift, scale, cu, norm=norm, backend="reference", **kwargs)
        assert rel_err(got.float(), want.float()) < (1e-6 if dtype == torch.float32 else 4e-3)
    per_token = torch.randn(total, channels, device="cuda")
    got = ops.adaln_modulate(x, per_token, per_token, norm=norm, backend="cuda", cu_seqlens=cu)
    want = ops.adaln_modulate(x, per_token, per_token, norm=norm, backend="reference", cu_seqlens=cu)
    assert rel_err(got.float(), want.float()) < (1e-6 if dtype == torch.float32 else 4e-3)


def test_adaln_modulate_cuda_backward_compile_opcheck():
    cu = packed_cu([4096, 1, 700]).cuda()
    x = torch.randn(4797, 3072, device="cuda").bfloat16().requires_grad_()
    shift, scale = (torch.randn(3, 3072, device="cuda", requires_grad=True) for _ in range(2))
    g = torch.randn(4797, 3072, device="cuda").bfloat16()
    got = torch.autograd.grad(ops.adaln_modulate(x, shift, scale, cu, backend="cuda"), (x, shift, scale), g)
    want = torch.autograd.grad(ops.adaln_modulate(x, shift, scale, cu, backend="reference"), (x, shift, scale), g)
    for a, b in zip(got, want):
        assert rel_err(a.float(), b.float()) < 1e-2
    compiled = torch.compile(lambda a: ops.adaln_modulate(a, shift, scale, cu, backend="cuda"), fullgraph=True)
    torch.testing.assert_close(compiled(x), ops.adaln_modulate(x, shift, scale, cu, backend="cuda"), atol=0, rtol=0)
    small = torch.randn(5, 64, device="cuda", requires_grad=True)
    mods = [torch.randn(2, 64, device="cuda", requires_grad=True) for _ in range(2)]
    args = (small, *mods, packed_cu([2, 3]).cuda(), "layer", 1e-6, None, None)
    torch.library.opcheck(torch.ops.fastdit.adaln_modulate_cuda.default, args)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_past_int32_offsets(backend):
    # 1.1M tokens x 16 heads x 128 = 2.25e9 elements > 2^31 in q; 700k x 3072 = 2.15e9 in x.
    grid = torch.tensor([[1, 1000, 1100], [1, 1, 1000]], dtype=torch.int32, device="cuda")
    cu = torch.tensor([0, 1_100_000, 1_101_000], dtype=torch.int32, device="cuda")
    q = torch.randn(1_101_000, 16, 128, device="cuda", dtype=torch.bfloat16)
    out = ops.rope3d(q, grid, cu, backend=backend)
    tail_grid = grid[1:].clone()
    want = ops.rope3d(q[-1000:], tail_grid, packed_cu([1000]).cuda(), backend="reference")
    torch.testing.assert_close(out[-1000:], want, **rope_tolerance(q[-1000:]))
    del q, out
    x = torch.randn(700_000, 3072, device="cuda", dtype=torch.bfloat16)
    shift, scale = torch.randn(2, 3072, device="cuda"), torch.randn(2, 3072, device="cuda")
    cu = torch.tensor([0, 600_000, 700_000], dtype=torch.int32, device="cuda")
    out = ops.adaln_modulate(x, shift, scale, cu, backend=backend)
    want = ops.adaln_modulate(x[-1000:], shift[1:], scale[1:], packed_cu([1000]).cuda(), backend="reference")
    assert rel_err(out[-1000:].float(), want.float()) < 4e-3

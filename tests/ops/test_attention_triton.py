"""The triton backend of varlen_attention / attention (CPU: TRITON_INTERPRET=1; GPU: -m gpu)."""

import pytest
import torch
import torch.nn.functional as F

from fastdit import ops, settings
from fastdit.benchmarks.attention import TRITON_VARIANTS  # the opt-in paths the benchmark A/Bs
from tests.conftest import CPU_BACKENDS, packed_cu, rel_err
from tests.ops.test_attention import attention_oracle

pytestmark = [
    pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not installed"),
    pytest.mark.triton_cpu,
]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}
SELF = [[1], [17], [1, 17, 5], [33, 1, 20]]
CROSS = [([17, 4], [3, 9]), ([1, 6], [5, 1]), ([20, 3], [40, 2])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 72, 96, 128])
@pytest.mark.parametrize("lengths", SELF)
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_matches_oracle(dtype, head_dim, lengths, causal, poison_outputs):
    total = sum(lengths)
    q, k, v = (torch.randn(total, 2, head_dim).to(dtype) for _ in range(3))
    cu = packed_cu(lengths)
    out, lse = ops.varlen_attention(
        q, k, v, cu, cu, max(lengths), max(lengths), causal=causal, return_lse=True, backend="triton"
    )
    expect, expect_lse = attention_oracle(q, k, v, lengths, lengths, causal=causal)
    torch.testing.assert_close(out.double(), expect, atol=TOL[dtype] * 5, rtol=TOL[dtype])
    torch.testing.assert_close(lse.double(), expect_lse, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("len_q, len_k", CROSS)
@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_gqa_matches_oracle(len_q, len_k, causal, poison_outputs):
    q = torch.randn(sum(len_q), 4, 24)
    k, v = (torch.randn(sum(len_k), 2, 24) for _ in range(2))
    out, lse = ops.varlen_attention(
        q, k, v, packed_cu(len_q), packed_cu(len_k), max(len_q), max(len_k), softmax_scale=0.3, causal=causal,
        return_lse=True, backend="triton",
    )  # fmt: skip
    expect, expect_lse = attention_oracle(q, k, v, len_q, len_k, scale=0.3, causal=causal)
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expect_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("len_q, len_k, heads, kv_heads", [([1, 17, 5], [1, 17, 5], 2, 2), ([20, 3], [7, 33], 4, 2)])
def test_gradients_match_float64(causal, len_q, len_k, heads, kv_heads, poison_outputs):
    cq, ck = packed_cu(len_q), packed_cu(len_k)
    q = torch.randn(sum(len_q), heads, 40, requires_grad=True)
    k, v = (torch.randn(sum(len_k), kv_heads, 40, requires_grad=True) for _ in range(2))
    w = torch.randn(sum(len_q), heads, 40, dtype=torch.float64)
    out = ops.varlen_attention(q, k, v, cq, ck, max(len_q), max(len_k), causal=causal, backend="triton")
    got = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    doubles = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = ops.varlen_attention(*doubles, cq, ck, max(len_q), max(len_k), causal=causal, backend="reference")
    want = torch.autograd.grad((ref * w).sum(), doubles)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


def test_dense_attention_matches_sdpa_and_repeats_bitwise():
    q = torch.randn(2, 11, 4, 32)
    k, v = (torch.randn(2, 19, 4, 32) for _ in range(2))
    out = ops.attention(q, k, v, backend="triton")
    expect = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)
    assert torch.equal(ops.attention(q, k, v, backend="triton"), out)  # deterministic


def test_opcheck():
    from fastdit.ops.attention import varlen_attention_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if device == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    cq, ck = packed_cu([3, 2], device=device), packed_cu([4, 1], device=device)
    q = torch.randn(5, 2, 16, device=device, requires_grad=True)
    k, v = (torch.randn(5, 1, 16, device=device, requires_grad=True) for _ in range(2))
    torch.library.opcheck(varlen_attention_triton, (q, k, v, cq, ck, 3, 4, 0.25, True), test_utils=utils)


def test_triton_is_not_picked_on_cpu_and_head_dim_limit():
    inputs = {"device": torch.device("cpu"), "dtype": torch.float16, "head_dim": 64, "causal": False}
    assert ops.select_backend("varlen_attention", inputs).name == "torch"  # PyTorch's CPU flash kernel, not the oracle
    too_big = dict(inputs, head_dim=512)
    with pytest.raises(ops.BackendNotSupportedError, match="head_dim 512 > 256"):
        ops.select_backend("varlen_attention", too_big, backend="triton")


def check_cuda_bf16_error_budget(lengths, head_dim, causal, backend=None, compile_too=True):
    """bf16 output and gradients against float64 at most 2x PyTorch's own bf16 SDPA error (the
    flash-attn rule), a bitwise-identical repeat, and the same result under torch.compile."""
    cu = packed_cu(lengths).cuda()
    longest = max(lengths)
    q, k, v = (torch.randn(sum(lengths), 8, head_dim, device="cuda", dtype=torch.float64) for _ in range(3))
    w = torch.randn_like(q)
    bf = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = ops.varlen_attention(*bf, cu, cu, longest, longest, causal=causal, backend=backend)
    grads = torch.autograd.grad((out.double() * w).sum(), bf)
    d64 = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ops.varlen_attention(*d64, cu, cu, longest, longest, causal=causal, backend="reference")
    ref_grads = torch.autograd.grad((ref * w).sum(), d64)
    sdpa_out, start = [], 0
    sb = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    for n in lengths:
        qs, ks, vs = (t[start : start + n].transpose(0, 1) for t in sb)
        sdpa_out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1))
        start += n
    sdpa = torch.cat(sdpa_out)
    sdpa_grads = torch.autograd.grad((sdpa.double() * w).sum(), sb)
    assert (out.double() - ref).abs().max() <= 2 * (sdpa.double() - ref).abs().max()
    for g, s, r in zip(grads, sdpa_grads, ref_grads):
        assert (g.double() - r).abs().max() <= 2 * (s.double() - r).abs().max()
    assert torch.equal(ops.varlen_attention(*bf, cu, cu, longest, longest, causal=causal, backend=backend), out)
    if compile_too:
        compiled = torch.compile(lambda a, b, c: ops.varlen_attention(a, b, c, cu, cu, longest, longest, causal=causal,
                                                                      backend=backend), fullgraph=True)  # fmt: skip
        # Inductor autotunes on its own and may pick another tile (another summation order):
        # the compiled op is held to the same error budget, not to eager's bits.
        assert (compiled(*bf).double() - ref).abs().max() <= 2 * (sdpa.double() - ref).abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 72, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_bf16_error_budget_and_compile(head_dim, causal):
    check_cuda_bf16_error_budget([4096, 77, 1, 2100], head_dim, causal)  # the dispatcher picks triton


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(TRITON_VARIANTS))
@pytest.mark.parametrize("head_dim, causal", [(128, False), (64, True), (72, False)])
def test_cuda_opt_in_variants_keep_the_error_budget(set_setting, variant, head_dim, causal, poison_outputs):
    """Each opt-in path on the H100 (TMA, persistent, Hopper warp specialization, forward and
    backward) keeps the default path's error budget, with NaN-poisoned outputs (an unwritten tile
    fails) and, at D = 128, under torch.compile (Triton's TMA scratch allocator)."""
    set_setting(**TRITON_VARIANTS[variant])
    check_cuda_bf16_error_budget([3000, 77, 1, 1100], head_dim, causal, backend="triton", compile_too=head_dim == 128)


@pytest.mark.gpu
def test_cuda_packed_batch_past_int32_offsets():
    # 701 samples, 701,000 tokens x 24 heads x 128 = 2.15e9 elements per tensor > 2^31.
    lengths = [1000] * 701
    cu = packed_cu(lengths).cuda()
    q, k, v = (torch.randn(sum(lengths), 24, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = ops.varlen_attention(q, k, v, cu, cu, 1000, 1000, backend="triton")
    tail = slice(sum(lengths) - 1000, sum(lengths))
    one = packed_cu([1000]).cuda()
    want = ops.varlen_attention(q[tail], k[tail], v[tail], one, one, 1000, 1000, backend="reference")
    assert rel_err(out[tail].float(), want.float()) < 1e-2


def test_longest_first_schedule_order():
    from fastdit.kernels.attention import longest_first

    cu_q, cu_k = packed_cu([4, 100, 1, 30]), packed_cu([8, 2, 1, 30])
    # work Lq * Lk: 32, 200, 1, 900 -> samples 3, 1, 0, 2
    assert longest_first(cu_q, cu_k).tolist() == [3, 1, 0, 2]


@pytest.mark.parametrize("head_dim", [64, 72])
@pytest.mark.parametrize("causal", [False, True])
def test_tma_path_matches_the_reference(set_setting, head_dim, causal, poison_outputs):
    """FASTDIT_ATTN_TMA=1: K / V through tensor descriptors (interpreted here), across sample
    boundaries, past the tensor's end and with padded head dims (72 -> 128)."""
    from fastdit.kernels.attention import use_tma

    set_setting(attn_tma=True)
    len_q, len_k = [5, 33, 1], [19, 2, 40]
    cq, ck = packed_cu(len_q), packed_cu(len_k)
    q = torch.randn(sum(len_q), 4, head_dim)
    k, v = (torch.randn(sum(len_k), 2, head_dim) for _ in range(2))
    head_major = k.transpose(0, 1).contiguous().transpose(0, 1)  # heads not adjacent: masked loads
    assert use_tma(k, v) and not use_tma(head_major, v) and not use_tma(k[..., ::2], v[..., ::2])
    out = ops.varlen_attention(q, k, v, cq, ck, max(len_q), max(len_k), causal=causal, backend="triton")
    expect = ops.varlen_attention(q.double(), k.double(), v.double(), cq, ck, max(len_q), max(len_k), causal=causal,
                                  backend="reference")  # fmt: skip
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)


def _assert_forward_matches_float64_reference(q, k, v, len_q, len_k, causal):
    """Triton's output and LSE against the reference op in float64 (where its LSE is finite);
    returns the Triton LSE and that finite mask."""
    cq, ck = packed_cu(len_q), packed_cu(len_k)
    out, lse = ops.varlen_attention(q, k, v, cq, ck, max(len_q), max(len_k), causal=causal, return_lse=True,
                                    backend="triton")  # fmt: skip
    want, want_lse = ops.varlen_attention(q.double(), k.double(), v.double(), cq, ck, max(len_q), max(len_k),
                                          causal=causal, return_lse=True, backend="reference")  # fmt: skip
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.double()[finite], want_lse[finite], atol=1e-5, rtol=1e-5)
    return lse, finite


@pytest.mark.parametrize("tma", ["0", "1"])
@pytest.mark.parametrize("causal", [False, True])
def test_persistent_schedule_matches_the_reference(set_setting, tma, causal, poison_outputs):
    """FASTDIT_ATTN_PERSISTENT=1: a fixed grid (3 programs here) walks every tile of a mixed
    batch, longest sample first; a tile it skipped would stay NaN."""
    set_setting(attn_persistent=True)
    set_setting(attn_tma=tma == "1")
    len_q, len_k = [40, 1, 17, 3], [9, 33, 17, 1]
    q = torch.randn(sum(len_q), 4, 32)
    k, v = (torch.randn(sum(len_k), 2, 32) for _ in range(2))
    _assert_forward_matches_float64_reference(q, k, v, len_q, len_k, causal)


@pytest.mark.parametrize("head_dim", [32, 72])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("persistent", ["0", "1"])
def test_warp_specialized_forward_matches_the_reference(set_setting, head_dim, causal, persistent, poison_outputs):
    """FASTDIT_ATTN_WS=1: q, k and v by TMA and no early return for empty query blocks
    (interpreted here; the specialization itself is checked in the sm_90 compile). Mixed
    self / cross lengths over GQA, a padded head dim (72 -> 128: q's columns past D belong to the
    next head and must be zeroed), a causal block with no visible key, alone and persistent."""
    from fastdit.kernels.attention import use_warp_specialization

    set_setting(attn_ws=True)
    set_setting(attn_persistent=persistent == "1")
    len_q, len_k = [5, 33, 1, 18], [19, 2, 40, 18]
    q = torch.randn(sum(len_q), 4, head_dim)
    k, v = (torch.randn(sum(len_k), 2, head_dim) for _ in range(2))
    assert use_warp_specialization(q, k, v)
    head_major = q.transpose(0, 1).contiguous().transpose(0, 1)  # heads not adjacent: the plain kernel
    assert not use_warp_specialization(head_major, k, v)
    odd = torch.randn(4, 3, 20, dtype=torch.float16)  # head offsets of 40 B: TMA boxes would misalign
    assert not use_warp_specialization(odd, odd, odd) and use_warp_specialization(*(odd.float(),) * 3)
    lse, finite = _assert_forward_matches_float64_reference(q, k, v, len_q, len_k, causal)
    assert torch.equal(torch.isfinite(lse), finite)


@pytest.mark.parametrize("switch", ["FASTDIT_ATTN_TMA", "FASTDIT_ATTN_WS", "FASTDIT_ATTN_BWD_WS"])
def test_tma_paths_read_views_of_a_fused_qkv_projection(set_setting, switch, poison_outputs):
    """q, k, v as views of one (tokens, 3, H, D) projection (token stride 3 H D, heads adjacent)
    qualify for TMA and give the reference's outputs and gradients."""
    from fastdit.kernels.attention import _tma_ready

    set_setting(**settings.from_switches({switch: "1"}))
    lengths = [17, 3, 30]
    cu = packed_cu(lengths)
    qkv = torch.randn(sum(lengths), 3, 4, 32, dtype=torch.float64)
    w = torch.randn(sum(lengths), 4, 32, dtype=torch.float64)
    fused = qkv.float().requires_grad_()
    q, k, v = fused.unbind(1)
    assert not q.is_contiguous() and _tma_ready(q, k, v)
    out = ops.varlen_attention(q, k, v, cu, cu, 30, 30, backend="triton")
    (grad,) = torch.autograd.grad((out.double() * w).sum(), fused)
    ref_in = qkv.clone().requires_grad_()
    want = ops.varlen_attention(*ref_in.unbind(1), cu, cu, 30, 30, backend="reference")
    (want_grad,) = torch.autograd.grad((want * w).sum(), ref_in)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-4, rtol=1e-4)


def test_warp_specialized_forward_feeds_the_backward(set_setting):
    """The backward reads the specialized forward's out and LSE: gradients against float64."""
    set_setting(attn_ws=True)
    lengths = [17, 3]
    cu = packed_cu(lengths)
    q, k, v = (torch.randn(sum(lengths), 2, 32, dtype=torch.float64) for _ in range(3))
    w = torch.randn_like(q)
    got = [t.float().requires_grad_() for t in (q, k, v)]
    out = ops.varlen_attention(*got, cu, cu, 17, 17, backend="triton")
    grads = torch.autograd.grad((out.double() * w).sum(), got)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad((ops.varlen_attention(*ref, cu, cu, 17, 17, backend="reference") * w).sum(), ref)
    for g, r in zip(grads, want):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head_dim", [32, 72])
@pytest.mark.parametrize("causal", [False, True])
def test_warp_specialized_backward_matches_float64(set_setting, head_dim, causal):
    """FASTDIT_ATTN_BWD_WS=1: dK/dV over one flat (GQA head, query block) loop and dQ, every
    tile by TMA (interpreted here). Mixed self / cross lengths (key blocks with no query, a query
    row with no visible key when causal), GQA 4 -> 2, a padded head dim, strided dO and lse."""
    from fastdit.kernels.attention import use_backward_warp_specialization

    set_setting(attn_bwd_ws=True)
    len_q, len_k = [5, 33, 1, 18], [19, 2, 40, 18]
    cq, ck = packed_cu(len_q), packed_cu(len_k)
    q = torch.randn(sum(len_q), 4, head_dim, dtype=torch.float64)
    k, v = (torch.randn(sum(len_k), 2, head_dim, dtype=torch.float64) for _ in range(2))
    assert use_backward_warp_specialization(q, k, v) and not use_backward_warp_specialization(q, k[..., ::2], v)
    w = torch.randn_like(q)
    got = [t.float().requires_grad_() for t in (q, k, v)]
    out = ops.varlen_attention(*got, cq, ck, max(len_q), max(len_k), causal=causal, backend="triton")
    grads = torch.autograd.grad((out.double() * w).sum(), got)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    want = ops.varlen_attention(*ref, cq, ck, max(len_q), max(len_k), causal=causal, backend="reference")
    want_grads = torch.autograd.grad((want * w).sum(), ref)
    for g, r in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)
    # the public backward, with and without specialization, given a strided dO and an lse view
    # whose token stride is not 1 (made contiguous by the op, not misread)
    o32, lse = ops.varlen_attention(*[t.float() for t in (q, k, v)], cq, ck, max(len_q), max(len_k), causal=causal,
                                    return_lse=True, backend="triton")  # fmt: skip
    dout = torch.randn(q.shape[0], 4, 2 * head_dim, dtype=torch.float64)[..., ::2]
    lse_view = lse.t().contiguous().t()
    o64, lse64 = ops.varlen_attention(q, k, v, cq, ck, max(len_q), max(len_k), causal=causal, return_lse=True,
                                      backend="reference")  # fmt: skip
    want = ops.varlen_attention_backward(dout, q, k, v, o64, lse64, cq, ck, max(len_q), max(len_k), causal=causal,
                                         backend="reference")  # fmt: skip
    for flag in ("1", "0"):
        set_setting(attn_bwd_ws=flag == "1")
        got = ops.varlen_attention_backward(dout.float(), *[t.float() for t in (q, k, v)], o32, lse_view, cq, ck,
                                            max(len_q), max(len_k), causal=causal, backend="triton")  # fmt: skip
        for g, r in zip(got, want):
            torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)

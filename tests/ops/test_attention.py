import math

import pytest
import torch
import torch.nn.functional as F

from fastdit import ops
from fastdit.ops.attention import attention_reference, varlen_attention_reference
from tests.conftest import packed_cu

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3}


def attention_oracle(q, k, v, len_q, len_k, *, scale=None, causal=False):
    """Per sample, per head, explicit float64 softmax; GQA by head index arithmetic."""
    heads, dim = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    scale = 1 / math.sqrt(dim) if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((heads, q.shape[0]), float("-inf"), dtype=torch.float64)
    sq = sk = 0
    for lq, lk in zip(len_q, len_k):
        for h in range(heads):
            qs = q[sq : sq + lq, h].double()
            ks, vs = k[sk : sk + lk, h // group].double(), v[sk : sk + lk, h // group].double()
            s = qs @ ks.T * scale
            if causal:
                allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
                s = s.masked_fill(~allowed, float("-inf"))
            for i in range(lq):
                if torch.isinf(s[i]).all():
                    continue  # no visible key: output 0, lse -inf
                lse[h, sq + i] = torch.logsumexp(s[i], 0)
                out[sq + i, h] = torch.softmax(s[i], 0) @ vs
        sq, sk = sq + lq, sk + lk
    return out, lse


SELF_LENGTHS = [[1], [17], [1, 17, 5], [9, 1, 12]]
CROSS = [([17, 4], [3, 9]), ([1, 6], [5, 1])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("head_dim", [8, 24])
@pytest.mark.parametrize("lengths", SELF_LENGTHS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_self_attention_matches_oracle(dtype, head_dim, lengths, causal):
    total = sum(lengths)
    q, k, v = (torch.randn(total, 3, head_dim, dtype=dtype) for _ in range(3))
    cu = packed_cu(lengths)
    out, lse = ops.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal, return_lse=True)
    expect, expect_lse = attention_oracle(q, k, v, lengths, lengths, causal=causal)
    assert out.dtype == dtype and lse.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(out.double(), expect, atol=TOL[dtype] * 5, rtol=TOL[dtype])
    torch.testing.assert_close(lse.double(), expect_lse, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("len_q, len_k", CROSS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_cross_attention_gqa_and_scale(len_q, len_k, causal):
    q = torch.randn(sum(len_q), 4, 16, dtype=torch.float64)
    k, v = (torch.randn(sum(len_k), 2, 16, dtype=torch.float64) for _ in range(2))
    out, lse = ops.varlen_attention(
        q,
        k,
        v,
        packed_cu(len_q),
        packed_cu(len_k),
        max(len_q),
        max(len_k),
        softmax_scale=0.3,
        causal=causal,
        return_lse=True,
    )
    expect, expect_lse = attention_oracle(q, k, v, len_q, len_k, scale=0.3, causal=causal)
    torch.testing.assert_close(out, expect, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, expect_lse.to(lse.dtype), atol=1e-10, rtol=1e-10)


def test_causal_rows_without_keys_are_zero():
    # Lq = 6 > Lk = 2: bottom-right alignment leaves the first 4 queries with no key.
    q = torch.randn(6, 1, 8)
    k, v = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    out, lse = ops.varlen_attention(q, k, v, packed_cu([6]), packed_cu([2]), 6, 2, causal=True, return_lse=True)
    assert torch.equal(out[:4], torch.zeros_like(out[:4])) and torch.isinf(lse[:, :4]).all()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sk", [7, 11])
def test_dense_attention_matches_sdpa_float64(causal, sk):
    q = torch.randn(2, 11, 4, 16, dtype=torch.float64)
    k, v = (torch.randn(2, sk, 2, 16, dtype=torch.float64) for _ in range(2))
    out = ops.attention(q, k, v, causal=causal)
    kr, vr = (t.repeat_interleave(2, dim=2).transpose(1, 2) for t in (k, v))
    mask = None
    if causal:
        mask = torch.arange(sk)[None, :] <= torch.arange(11)[:, None] + (sk - 11)
    expect = F.scaled_dot_product_attention(q.transpose(1, 2), kr, vr, attn_mask=mask).transpose(1, 2)
    valid = mask.any(-1) if causal else torch.ones(11, dtype=torch.bool)
    torch.testing.assert_close(out[:, valid], expect[:, valid], atol=1e-10, rtol=1e-10)


def test_dense_equals_varlen():
    q, k, v = (torch.randn(3, 10, 2, 8) for _ in range(3))
    cu = packed_cu([10, 10, 10])
    packed = ops.varlen_attention(*(t.reshape(30, 2, 8) for t in (q, k, v)), cu, cu, 10, 10)
    torch.testing.assert_close(ops.attention(q, k, v).reshape(30, 2, 8), packed, atol=0, rtol=0)


def test_attention_gradcheck():
    len_q, len_k = [3, 1], [2, 4]
    cq, ck = packed_cu(len_q), packed_cu(len_k)
    q = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(6, 1, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for causal in (False, True):
        fn = lambda *a, causal=causal: ops.varlen_attention(*a, cq, ck, 3, 4, causal=causal)
        assert torch.autograd.gradcheck(fn, (q, k, v))
    qd, kd, vd = (torch.randn(2, 3, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda *a: ops.attention(*a, causal=True), (qd, kd, vd))


def test_attention_opcheck():
    cq, ck = packed_cu([3, 2]), packed_cu([4, 1])
    q = torch.randn(5, 2, 8, requires_grad=True)
    k, v = (torch.randn(5, 1, 8, requires_grad=True) for _ in range(2))
    torch.library.opcheck(varlen_attention_reference, (q, k, v, cq, ck, 3, 4, 0.35, False))
    torch.library.opcheck(varlen_attention_reference, (q, k, v, cq, ck, 3, 4, 0.35, True))
    qd, kd, vd = (torch.randn(2, 3, 2, 8, requires_grad=True) for _ in range(3))
    torch.library.opcheck(attention_reference, (qd, kd, vd, 0.35, False))


def test_attention_compiled_matches_eager():
    cq, ck = packed_cu([3, 5]), packed_cu([2, 6])
    q, k, v = torch.randn(8, 2, 8), torch.randn(8, 2, 8), torch.randn(8, 2, 8)

    def fn(q, k, v):
        return ops.varlen_attention(q, k, v, cq, ck, 5, 6), ops.attention(q[None], k[None], v[None], causal=True)

    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(q, k, v), fn(q, k, v)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def _varlen(**changes):
    args = dict(
        q=torch.randn(6, 2, 8),
        k=torch.randn(6, 2, 8),
        v=torch.randn(6, 2, 8),
        cu_seqlens_q=packed_cu([2, 4]),
        cu_seqlens_k=packed_cu([3, 3]),
        max_seqlen_q=4,
        max_seqlen_k=3,
    )
    kwargs = {k: changes.pop(k) for k in list(changes) if k not in args}
    args.update(changes)
    return ops.varlen_attention(*args.values(), **kwargs)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(cu_seqlens_q=packed_cu([2, 4]).long()), TypeError, "cu_seqlens_q must have dtype"),
        (dict(cu_seqlens_q=packed_cu([0, 6])), ValueError, "cu_seqlens_q must be sample lengths >= 1"),
        (dict(cu_seqlens_k=torch.tensor([0, 4, 3], dtype=torch.int32)), ValueError, "non-decreasing"),
        (dict(cu_seqlens_k=packed_cu([3, 2])), ValueError, "cu_seqlens_k.* must equal the number of packed"),
        (dict(cu_seqlens_k=packed_cu([2, 2, 2])), ValueError, "same number of samples"),
        (dict(max_seqlen_q=3), ValueError, "max_seqlen_q=3 is smaller than the longest sample"),
        (dict(max_seqlen_k=3.0), TypeError, "max_seqlen_k must be a Python int"),
        (dict(k=torch.randn(6, 3, 8), v=torch.randn(6, 3, 8)), ValueError, "must divide q's head count"),
        (dict(v=torch.randn(6, 2, 4)), ValueError, "share head_dim"),
        (dict(v=torch.randn(6, 2, 8).half()), TypeError, "q, k and v must share one dtype"),
        (dict(q=torch.randn(6, 16)), ValueError, "q must have 3 dims"),
        (dict(k=torch.randn(6, 2, 8, device="meta")), ValueError, "k is on meta"),
        (dict(softmax_scale="big"), TypeError, "softmax_scale must be a float"),
    ],
)
@pytest.mark.bad_input
def test_varlen_attention_bad_input(changes, error, match):
    with pytest.raises(error, match=match):
        _varlen(**changes)


@pytest.mark.bad_input
def test_dense_attention_bad_input():
    with pytest.raises(ValueError, match="same batch size"):
        ops.attention(torch.randn(2, 3, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8))
    with pytest.raises(ValueError, match="sequence lengths must be >= 1"):
        ops.attention(torch.randn(1, 0, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8))


@pytest.mark.gpu
def test_varlen_attention_reference_cuda_bf16_error_budget():
    # bf16 error against float64 at most 2x PyTorch's own bf16 SDPA error (the flash-attn rule).
    lengths = [1024, 77, 513]
    cu = packed_cu(lengths)
    q, k, v = (torch.randn(sum(lengths), 4, 128, dtype=torch.float64) for _ in range(3))
    expect, _ = attention_oracle(q, k, v, lengths, lengths)
    out = ops.varlen_attention(*(t.cuda().bfloat16() for t in (q, k, v)), cu.cuda(), cu.cuda(), 1024, 1024)
    sdpa, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].cuda().bfloat16().transpose(0, 1) for t in (q, k, v))
        sdpa.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
        start += n
    err = (out.cpu().double() - expect).abs().max().item()
    sdpa_err = (torch.cat(sdpa).cpu().double() - expect).abs().max().item()
    assert err <= 2 * sdpa_err, (err, sdpa_err)

"""fastdit.flash_attn: flash-attn 2.x's functional API (signatures, return forms, zero-length
samples, int64 cu_seqlens, GQA / MQA, odd head dims, Lq != Lk with bottom-right causal) against a
float64 reference, forward and gradients, on the CPU backends."""

import inspect
import math

import pytest
import torch

from fastdit import flash_attn
from fastdit.ops.dispatch import BackendNotSupportedError
from tests.conftest import rel_err

BACKENDS = ["torch", "reference"]

# flash-attn 2.x's parameter order (flash_attn/flash_attn_interface.py), which positional callers rely on
SIGNATURES = {
    "flash_attn_func": "q k v dropout_p softmax_scale causal window_size softcap alibi_slopes deterministic "
    "return_attn_probs",
    "flash_attn_varlen_func": "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p softmax_scale "
    "causal window_size softcap alibi_slopes deterministic return_attn_probs block_table",
    "flash_attn_qkvpacked_func": "qkv dropout_p softmax_scale causal window_size softcap alibi_slopes deterministic "
    "return_attn_probs",
    "flash_attn_kvpacked_func": "q kv dropout_p softmax_scale causal window_size softcap alibi_slopes deterministic "
    "return_attn_probs",
    "flash_attn_varlen_qkvpacked_func": "qkv cu_seqlens max_seqlen dropout_p softmax_scale causal window_size softcap "
    "alibi_slopes deterministic return_attn_probs",
    "flash_attn_varlen_kvpacked_func": "q kv cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p "
    "softmax_scale causal window_size softcap alibi_slopes deterministic return_attn_probs",
    "apply_rotary_emb": "x cos sin interleaved inplace seqlen_offsets cu_seqlens max_seqlen",
}


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_signatures_are_flash_attns(name):
    """Catches a positional slot moved or a keyword renamed (a peer's positional call would bind
    softmax_scale to dropout_p, say)."""
    params = [p for p in inspect.signature(getattr(flash_attn, name)).parameters.values()
              if p.kind != inspect.Parameter.KEYWORD_ONLY]  # fmt: skip
    assert [p.name for p in params] == SIGNATURES[name].split()


def _reference(q, k, v, scale, causal):
    """One sample in float64: q (Lq, H, D), k / v (Lk, Hk, D) -> out, lse (H, Lq); causal aligned
    bottom-right (query i sees key j iff j <= i + Lk - Lq)."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        hidden = torch.arange(lk)[None, :] > torch.arange(lq)[:, None] + (lk - lq)
        logits = logits.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.where(torch.isneginf(lse)[..., None], 0.0, (logits - lse[..., None]).exp())
    return torch.einsum("hqk,khd->qhd", probs, v), lse


def _qkv(batch, seq_q, seq_k, heads, heads_k, dim, grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, dim, generator=gen)
    k, v = (torch.randn(batch, seq_k, heads_k, dim, generator=gen) for _ in range(2))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _check_grads(got_out, want_out, leaves, tolerance=1e-5):
    weight = torch.randn(got_out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((got_out * weight).sum(), leaves)
    want = torch.autograd.grad((want_out * weight.double()).sum(), leaves)
    for g, w in zip(grads, want):
        assert rel_err(g, w) <= tolerance


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q, seq_k", [(17, 17), (5, 9), (9, 5)])
@pytest.mark.parametrize("heads_k, dim", [(4, 16), (2, 40), (1, 59)])  # MHA, GQA, MQA; odd head dims
def test_flash_attn_func_matches_float64_forward_and_gradients(backend, causal, seq_q, seq_k, heads_k, dim):
    """flash-attn's own criteria: output, LSE and gradients against a float64 reference, causal
    bottom-right with Lq != Lk, GQA / MQA, head dims not multiples of 8. Catches top-left causal
    alignment, KV heads mapped to the wrong query group, and an LSE in the wrong layout or base."""
    q, k, v = _qkv(2, seq_q, seq_k, 4, heads_k, dim)
    scale = 0.7 / math.sqrt(dim)
    out, lse, probs = flash_attn.flash_attn_func(q, k, v, 0.0, scale, causal, return_attn_probs=True, backend=backend)
    assert probs is None and lse.dtype == torch.float32 and lse.shape == (2, 4, seq_q)
    per_sample = [_reference(q[b], k[b], v[b], scale, causal) for b in range(2)]
    want = torch.stack([o for o, _ in per_sample])
    want_lse = torch.stack([w for _, w in per_sample])
    assert rel_err(out, want) <= 1e-5
    finite = torch.isfinite(want_lse)  # causal Lq > Lk: the first queries see no key (lse -inf, out 0)
    assert torch.equal(torch.isfinite(lse), finite) and rel_err(lse[finite], want_lse[finite]) <= 1e-5
    _check_grads(out, want, [q, k, v])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_with_zero_length_samples_and_int64_cu_seqlens(backend, cu_dtype, causal):
    """Samples of (Lq, Lk) = (5, 7), (0, 4), (3, 0), (6, 6), (4, 2): catches an empty sample refused
    (flash-attn allows them), a query sample with no key left uninitialised or NaN instead of out
    0 / LSE -inf, rows of one sample scattered into another's, and int64 cu_seqlens refused."""
    lens_q, lens_k = [5, 0, 3, 6, 4], [7, 4, 0, 6, 2]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens_q), 4, 16, generator=gen).requires_grad_()
    k, v = (torch.randn(sum(lens_k), 2, 16, generator=gen).requires_grad_() for _ in range(2))
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=cu_dtype)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=cu_dtype)
    out, lse, _ = flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                    return_attn_probs=True, backend=backend)  # fmt: skip
    assert out.shape == q.shape and lse.shape == (4, sum(lens_q))
    outs, lses = [], []
    for i in range(5):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        o, s = _reference(q[qs], k[ks], v[ks], 0.25, causal)
        outs.append(o)
        lses.append(s)
    want, want_lse = torch.cat(outs), torch.cat(lses, dim=1)
    assert rel_err(out, want) <= 1e-5 and not out[int(cu_q[2]) : int(cu_q[3])].any()
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite) and rel_err(lse[finite], want_lse[finite]) <= 1e-5
    _check_grads(out, want, [q, k, v])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_forms_equal_the_unpacked_calls(backend):
    """Catches q, k and v taken from the wrong slot of a packed qkv / kv tensor."""
    q, k, v = _qkv(2, 6, 6, 4, 4, 16, grad=False)
    want = flash_attn.flash_attn_func(q, k, v, causal=True, backend=backend)
    qkv = torch.stack([q, k, v], dim=2)
    assert torch.equal(flash_attn.flash_attn_qkvpacked_func(qkv, causal=True, backend=backend), want)
    assert torch.equal(flash_attn.flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2), causal=True,
                                                           backend=backend), want)  # fmt: skip
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    packed = flash_attn.flash_attn_varlen_qkvpacked_func(qkv.flatten(0, 1), cu, 6, causal=True, backend=backend)
    assert rel_err(packed.view(2, 6, 4, 16), want) <= 1e-6
    kv = torch.stack([k, v], dim=2).flatten(0, 1)
    packed = flash_attn.flash_attn_varlen_kvpacked_func(q.flatten(0, 1), kv, cu, cu, 6, 6, causal=True,
                                                        backend=backend)  # fmt: skip
    assert rel_err(packed.view(2, 6, 4, 16), want) <= 1e-6


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dropout_p=0.1), "dropout_p=0.1"),
        (dict(window_size=(4, 0)), "window_size=\\(4, 0\\)"),
        (dict(softcap=30.0), "softcap"),
        (dict(alibi_slopes=torch.ones(4)), "alibi_slopes"),
    ],
)
def test_unserved_options_are_refused_by_name(kwargs, match):
    """Catches an option flash-attn honours silently ignored (dropout, local windows, softcap,
    ALiBi): the result would be plain attention, wrong without an error."""
    q, k, v = _qkv(1, 4, 4, 4, 4, 16, grad=False)
    with pytest.raises(BackendNotSupportedError, match=match):
        flash_attn.flash_attn_func(q, k, v, **kwargs)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(BackendNotSupportedError, match=match):
        flash_attn.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 4, 4, **kwargs)


@pytest.mark.bad_input
def test_bad_cu_seqlens_and_packed_shapes_are_named():
    """Catches float / decreasing / short cu_seqlens reaching the kernel, a max_seqlen below the
    longest sample, a paged-KV block_table ignored, and a malformed packed tensor."""
    q = torch.randn(6, 2, 8)
    good = torch.tensor([0, 6], dtype=torch.int32)
    for cu, match in [(torch.tensor([0.0, 6.0]), "int32 or int64"), (torch.tensor([0, 4, 3, 6]), "never decrease"),
                      (torch.tensor([0, 5]), "end at 6"), (torch.tensor([1, 6]), "start at 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            flash_attn.flash_attn_varlen_func(q, q, q, cu, good, 6, 6)
    with pytest.raises(ValueError, match="below the longest"):
        flash_attn.flash_attn_varlen_func(q, q, q, good, good, 5, 6)
    with pytest.raises(BackendNotSupportedError, match="block_table"):
        flash_attn.flash_attn_varlen_func(q, q, q, good, good, 6, 6, block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="qkv must be a 5-D tensor with 3 at dim -3"):
        flash_attn.flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 8))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offsets", [0, 3, "per-sample"])
def test_apply_rotary_emb_matches_the_formula(interleaved, offsets):
    """flash-attn's rotary: the first rotary_dim features rotate (interleaved or half-split pairs),
    the rest pass through, positions shifted per sample. Catches the pairing swapped, sin's sign
    flipped, the pass-through features rotated, and offsets ignored."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 12, generator=gen)
    angles = torch.randn(16, 4, generator=gen, dtype=torch.float64)  # rotary_dim 8 of 12
    cos, sin = angles.cos().float(), angles.sin().float()
    shift = torch.tensor([1, 4]) if offsets == "per-sample" else offsets
    got = flash_attn.apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=shift)
    want = x.double().clone()
    for b in range(2):
        start = int(shift[b]) if isinstance(shift, torch.Tensor) else shift
        c, s = angles[start : start + 5].cos()[:, None, :], angles[start : start + 5].sin()[:, None, :]
        idx_a, idx_b = (slice(0, 8, 2), slice(1, 8, 2)) if interleaved else (slice(0, 4), slice(4, 8))
        a, bb = x[b, :, :, idx_a].double(), x[b, :, :, idx_b].double()
        want[b, :, :, idx_a], want[b, :, :, idx_b] = a * c - bb * s, a * s + bb * c
    assert rel_err(got, want) <= 1e-6 and torch.equal(got[..., 8:], x[..., 8:])
    inplace = x.clone()
    assert flash_attn.apply_rotary_emb(inplace, cos, sin, interleaved, True, shift) is inplace
    assert torch.equal(inplace, got)


def test_a_peers_flash_attn_code_runs_unchanged(monkeypatch):
    """diffusers' own flash-attn backends (`_flash_attention`, `_flash_varlen_attention` with a
    key-padding mask, which packs the kept keys and builds cu_seqlens itself), with their
    ``flash_attn_func`` / ``flash_attn_varlen_func`` names bound to fastdit's: catches any
    keyword flash-attn code passes that fastdit's functions do not take or read differently
    (return_attn_probs unpacking, window_size, the varlen layout)."""
    attention_dispatch = pytest.importorskip("diffusers.models.attention_dispatch", reason="diffusers is the peer")
    monkeypatch.setattr(attention_dispatch, "flash_attn_func", flash_attn.flash_attn_func, raising=False)
    monkeypatch.setattr(attention_dispatch, "flash_attn_varlen_func", flash_attn.flash_attn_varlen_func, raising=False)
    q, k, v = _qkv(2, 6, 9, 4, 4, 16, grad=False)

    def sdpa(mask=None, causal=False):
        return torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask, is_causal=causal
        ).transpose(1, 2)

    out, lse = attention_dispatch._flash_attention(q, k, v, return_lse=True)
    assert rel_err(out, sdpa()) <= 1e-5 and lse.shape == (2, 4, 6)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 5:] = False  # the layout diffusers' varlen backend packs: padding at the end
    got = attention_dispatch._flash_varlen_attention(q, k, v, attn_mask=keep)
    assert rel_err(got, sdpa(keep[:, None, None, :])) <= 1e-5


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_emb_varlen_restarts_positions_per_sample(interleaved):
    """Packed (total, H, D) with cu_seqlens: catches positions running on across samples instead
    of restarting, per-sample offsets applied to the wrong sample, and an empty sample breaking
    the packing; each sample must equal the dense call on it alone."""
    gen = torch.Generator().manual_seed(0)
    lengths, shift = [4, 0, 6], torch.tensor([2, 5, 1])
    x = torch.randn(sum(lengths), 3, 12, generator=gen)
    angles = torch.randn(16, 4, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    cu = torch.tensor([0, 4, 4, 10], dtype=torch.int32)
    got = flash_attn.apply_rotary_emb(x, cos, sin, interleaved, seqlen_offsets=shift, cu_seqlens=cu, max_seqlen=6)
    for i, (start, n) in enumerate([(0, 4), (4, 0), (4, 6)]):
        if n:
            dense = flash_attn.apply_rotary_emb(x[None, start : start + n], cos, sin, interleaved,
                                                seqlen_offsets=int(shift[i]))  # fmt: skip
            assert torch.equal(got[start : start + n], dense[0])


@pytest.mark.bad_input
def test_apply_rotary_emb_bad_input_is_named():
    """Catches positions past the cos / sin table read out of range (wrong rotation silently, or
    an index error far from the cause), a short max_seqlen, and offsets of the wrong count."""
    x, cos = torch.randn(1, 5, 2, 8), torch.ones(6, 4)
    with pytest.raises(ValueError, match="cos / sin have 6 rows"):
        flash_attn.apply_rotary_emb(x, cos, cos, seqlen_offsets=2)
    packed, cu = torch.randn(7, 2, 8), torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen=3 is below"):
        flash_attn.apply_rotary_emb(packed, cos, cos, cu_seqlens=cu, max_seqlen=3)
    with pytest.raises(ValueError, match="one offset per sample"):
        flash_attn.apply_rotary_emb(packed, cos, cos, seqlen_offsets=torch.tensor([0, 1, 2]), cu_seqlens=cu)
    with pytest.raises(ValueError, match="rotary_dim 10 > head dim 8"):
        flash_attn.apply_rotary_emb(x, torch.ones(9, 5), torch.ones(9, 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_varlen_func_at_input_scales_against_float64(backend, scale):
    """Inputs at 1e-3 (near-uniform softmax), 1 and 1e3 (logits ~1e6: one key takes all), with a
    non-default softmax_scale. Catches a max not subtracted before exp (overflow at 1e3), an LSE
    computed in a lower precision than the output needs, or the scale applied twice."""
    lens = [9, 4, 13]
    gen = torch.Generator().manual_seed(7)
    q = (torch.randn(sum(lens), 4, 24, generator=gen) * scale).requires_grad_()
    k, v = ((torch.randn(sum(lens), 2, 24, generator=gen) * scale).requires_grad_() for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    softmax_scale = 0.11
    out, lse, _ = flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, 13, 13, softmax_scale=softmax_scale,
                                                    return_attn_probs=True, backend=backend)  # fmt: skip
    outs, lses = zip(*(_reference(q[a:b], k[a:b], v[a:b], softmax_scale, False)
                       for a, b in zip(cu.tolist(), cu.tolist()[1:])))  # fmt: skip
    want, want_lse = torch.cat(outs), torch.cat(lses, dim=1)
    assert rel_err(out, want) <= 1e-5 and rel_err(lse, want_lse) <= 1e-5
    if scale <= 1.0:  # at 1e3 the softmax is one-hot: its gradients are ~0 against rounding noise
        _check_grads(out, want, [q, k, v], tolerance=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison, where", [(float("nan"), "q"), (float("nan"), "k"), (float("inf"), "v"),
                                           (float("-inf"), "k")])  # fmt: skip
def test_varlen_func_nan_and_inf_propagate_as_in_the_reference(backend, poison, where):
    """One poisoned element in sample 1: its NaN / inf reaches exactly the outputs the float64
    reference gives non-finite values, and sample 0 stays finite. Catches a kernel that zeroes
    NaN (a masked max of -inf rows) or lets one sample's NaN leak into another's rows."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(12, 2, 16, generator=gen)
    k, v = (torch.randn(12, 2, 16, generator=gen) for _ in range(2))
    target = {"q": q, "k": k, "v": v}[where]
    target[8, 1, 3] = poison
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    out = flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, backend=backend)
    want = torch.cat([_reference(q[a:b], k[a:b], v[a:b], 0.25, False)[0] for a, b in ((0, 5), (5, 12))])
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.equal(torch.isinf(out), torch.isinf(want))
    assert torch.isfinite(out[:5]).all() and not torch.isfinite(want[5:]).all()
    finite = torch.isfinite(want)
    assert rel_err(out[finite], want[finite]) <= 1e-5

"""fastdit as a diffusers attention backend: torch SDPA's semantics (masks, causal alignment, GQA,
dropout), key-padding masks on the packed varlen kernel, and no silent fallback."""

import logging

import pytest
import torch
import torch.nn.functional as F

from fastdit import settings
from fastdit.integrations.diffusers import fastdit_attention, key_padding
from fastdit.ops import dispatch
from tests.conftest import rel_err

B, SQ, SK, H, D = 3, 6, 10, 4, 16


def _qkv(heads_k=H, seq_q=SQ, seq_k=SK, grad=False):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, seq_q, H, D, generator=gen)
    k, v = torch.randn(B, seq_k, heads_k, D, generator=gen), torch.randn(B, seq_k, heads_k, D, generator=gen)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _sdpa(q, k, v, **kwargs):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          **kwargs).transpose(1, 2)  # fmt: skip


def _padding():
    """Sample 0 keeps every key, sample 1 its first 7, sample 2 keys 3..8 (padding mid-sequence, as
    QwenImage's text-first layout)."""
    keep = torch.ones(B, SK, dtype=torch.bool)
    keep[1, 7:] = False
    keep[2, :3] = False
    keep[2, 9:] = False
    return keep


MASK_FORMS = {
    "bool [B,1,1,Sk] (HunyuanVideo, QwenImage)": lambda keep: keep[:, None, None, :],
    "bool [B,1,Sq,Sk] repeated per query (HunyuanVideo 1.5)": lambda keep: keep[:, None, None, :].expand(B, 1, SQ, SK),
    "additive [B,H,1,Sk] -10000 (LTX, SanaVideo)": lambda keep: (
        torch.where(keep, 0.0, -10000.0)[:, None, None, :].expand(B, H, 1, SK).contiguous()
    ),
    "additive -inf [B,1,1,Sk]": lambda keep: torch.where(keep, 0.0, float("-inf"))[:, None, None, :],
    "2-D [B,Sk] (diffusers reads it as [B,1,1,Sk])": lambda keep: keep,
}


@pytest.mark.parametrize("form", list(MASK_FORMS))
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_key_padding_masks_run_on_the_varlen_path_and_equal_sdpa(form, backend):
    """Catches a mask sent to SDPA silently (the trace would show no varlen call), the padded keys
    gathered from the wrong sample or position, a 2-D [B, Sk] mask read as [Sq, Sk], an additive
    -10000 taken for a bias; forward and input gradients against SDPA on the same mask."""
    keep = _padding()
    mask = MASK_FORMS[form](keep)
    q, k, v = _qkv(grad=True)
    sdpa_mask = mask[:, None, None, :] if mask.dim() == 2 else mask
    want = _sdpa(q, k, v, attn_mask=sdpa_mask)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    with dispatch.trace() as log:
        got = fastdit_attention(q, k, v, attn_mask=mask, backend=backend)
    assert ("varlen_attention", backend) in log and not any(b.startswith("fallback") for _, b in log), log
    got_grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    assert rel_err(got, want) <= 1e-5
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) <= 1e-5


def _row_masks():
    """HunyuanVideo 1.5's ``valid_q & valid_k`` (padded query rows see nothing) and its token
    refiner's (padded rows see key 0 only), as bool and as additive -inf."""
    valid = torch.ones(B, SK, dtype=torch.bool)
    valid[1, 6:] = False
    valid[2, 3:] = False
    both = valid[:, None, :SQ, None] & valid[:, None, None, :] if SQ <= SK else None
    refiner = both.clone()
    refiner[..., 0] = True
    return {"valid_q & valid_k": both, "refiner (key 0 forced)": refiner,
            "additive -inf": torch.where(refiner, 0.0, float("-inf"))}  # fmt: skip


@pytest.mark.parametrize("name", ["valid_q & valid_k", "refiner (key 0 forced)", "additive -inf"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_masks_whose_rows_differ_run_as_row_groups_and_equal_sdpa(name, backend):
    """Catches a per-query mask sent to SDPA (no varlen call in the trace), query rows scattered
    back to the wrong positions, a group's keys taken from another sample, and padded rows left
    uninitialised instead of SDPA's 0; forward and input gradients against SDPA."""
    mask = _row_masks()[name]
    q, k, v = _qkv(grad=True)
    with dispatch.trace() as log:
        got = fastdit_attention(q, k, v, attn_mask=mask, backend=backend)
    assert ("varlen_attention", backend) in log and not any(b.startswith("fallback") for _, b in log)
    weight = torch.randn(got.shape)
    (got * weight).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = _sdpa(q, k, v, attn_mask=mask)
    (want * weight).sum().backward()
    assert rel_err(got, want) <= 1e-5
    for g, t in zip(grads, (q, k, v)):
        assert rel_err(g, t.grad) <= 1e-5


@pytest.mark.parametrize(
    "name, make",
    [
        ("Cosmos' mask of ones (a constant per row)", lambda keep: torch.ones(B, 1, 1, SK)),
        ("a sample of -10000 everywhere (uniform softmax)",
         lambda keep: torch.where(torch.arange(B)[:, None, None, None] == 1, -10000.0, 0.0).expand(B, 1, 1, SK)),
        ("a constant 3 on kept keys, -10000 below it", lambda keep: torch.where(keep, 3.0, -9997.0)[:, None, None, :]),
    ],
)  # fmt: skip
def test_additive_masks_are_read_relative_to_each_rows_top(name, make):
    """Softmax ignores a constant per row, as fastdit does: catches a mask of ones refused as a
    bias (Cosmos ran on SDPA), -10000 on every key taken for padding (SDPA spreads the softmax
    over them; 0 would be wrong), and a kept value other than 0 read as a bias."""
    mask = make(_padding())
    q, k, v = _qkv()
    with dispatch.trace() as log:
        got = fastdit_attention(q, k, v, attn_mask=mask, backend="torch")
    assert not any(b.startswith("fallback") for _, b in log)
    # against float64 SDPA: float32 SDPA loses ~1e-4 adding logits to -10000, fastdit never adds them
    assert rel_err(got, _sdpa(q.double(), k.double(), v.double(), attn_mask=mask.double())) <= 1e-5


def test_a_sample_with_every_key_masked_gives_what_sdpa_gives():
    """Bool or -inf: SDPA gives 0 for those rows (torch 2.13); catches NaN from an empty softmax or
    the sample's rows left uninitialised."""
    keep = _padding()
    keep[1] = False
    q, k, v = _qkv()
    for mask in (keep[:, None, None, :], torch.where(keep, 0.0, float("-inf"))[:, None, None, :]):
        got = fastdit_attention(q, k, v, attn_mask=mask, backend="torch")
        assert torch.equal(got[1], torch.zeros_like(got[1]))
        assert rel_err(got, _sdpa(q, k, v, attn_mask=mask)) <= 1e-5


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: torch.randn(B, 1, 1, SK), "kept keys differ within a row"),
        (lambda: torch.where(_padding(), float("inf"), 0.0)[:, None, None, :], "kept keys differ within a row"),
        (lambda: torch.ones(SQ, SK, dtype=torch.bool).tril(), "distinct query rows"),
        (lambda: torch.rand(1, H, 1, SK) > 0.3, "differs between heads"),
        (lambda: torch.ones(B, 1, 1, SK, dtype=torch.int64), "dtype torch.int64"),
    ],
)
@pytest.mark.bad_input
def test_other_masks_are_reported_once_counted_and_refused_when_strict(make, reason, caplog):
    """Catches a silent fallback (no log, no count), a report per call instead of per call site
    and reason, and strict mode ignored. The fallback itself is SDPA on the same mask."""
    mask = make()
    q, k, v = _qkv()
    if mask.dtype != torch.int64:
        want = _sdpa(q, k, v, attn_mask=mask)
    before = sum(n for (op, _, why), n in dispatch.fallbacks().items() if reason in why)
    with caplog.at_level(logging.WARNING, logger="fastdit"), dispatch.trace() as log:
        for _ in range(3):
            if mask.dtype == torch.int64:  # SDPA itself refuses integer masks: the error is SDPA's
                with pytest.raises(RuntimeError):
                    fastdit_attention(q, k, v, attn_mask=mask, backend="torch")
            else:
                got = fastdit_attention(q, k, v, attn_mask=mask, backend="torch")
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert sum(reason in r.getMessage() for r in caplog.records) <= 1  # once per site and reason
    after = sum(n for (op, _, why), n in dispatch.fallbacks().items() if reason in why)
    assert after - before == 3 and ("attention", "fallback:torch SDPA") in log
    with settings.override(strict=True), pytest.raises(dispatch.BackendNotSupportedError, match="FASTDIT_STRICT"):
        fastdit_attention(q, k, v, attn_mask=mask, backend="torch")


@pytest.mark.parametrize("seq_q, seq_k", [(4, 9), (9, 4), (6, 6)])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_causal_is_aligned_top_left_as_sdpa(seq_q, seq_k, backend):
    """diffusers' is_causal means SDPA's top-left mask; fastdit's kernels align bottom-right. Catches
    the kernel's alignment passed through for Sq != Sk (queries would see other keys)."""
    q, k, v = _qkv(seq_q=seq_q, seq_k=seq_k)
    got = fastdit_attention(q, k, v, is_causal=True, backend=backend)
    assert rel_err(got, _sdpa(q, k, v, is_causal=True)) <= 1e-5


@pytest.mark.bad_input
def test_gqa_needs_enable_gqa_and_dropout_or_mask_with_causal_are_refused():
    """Catches grouped heads run when the caller did not ask for GQA (SDPA refuses them), dropout
    silently ignored, and a mask combined with is_causal (SDPA refuses it)."""
    q, k, v = _qkv(heads_k=2)
    with pytest.raises(ValueError, match="need enable_gqa=True"):
        fastdit_attention(q, k, v, backend="torch")
    got = fastdit_attention(q, k, v, enable_gqa=True, backend="torch")
    assert rel_err(got, _sdpa(q, k, v, enable_gqa=True)) <= 1e-5
    with pytest.raises(ValueError, match="dropout_p=0.1 is not served"):
        fastdit_attention(*_qkv(), dropout_p=0.1)
    with pytest.raises(ValueError, match="attn_mask and is_causal together"):
        fastdit_attention(*_qkv(), attn_mask=_padding()[:, None, None, :], is_causal=True)


def test_key_padding_reads_the_forms_and_names_the_rest():
    keep = _padding()
    got, why = key_padding(keep[:, None, None, :], B, H, SQ, SK)
    assert why is None and torch.equal(got, keep)
    got, why = key_padding(torch.ones(1, 1, 1, SK, dtype=torch.bool), B, H, SQ, SK)  # one mask for every sample
    assert why is None and got.shape == (B, SK) and bool(got.all())
    assert "does not broadcast" in key_padding(torch.ones(B, 1, 1, SK + 1, dtype=torch.bool), B, H, SQ, SK)[1]
    assert "differs between queries" in key_padding(_row_masks()["refiner (key 0 forced)"], B, H, SQ, SK)[1]


@pytest.mark.bad_input
def test_enable_refuses_an_unknown_backend_at_once():
    pytest.importorskip("diffusers")
    from fastdit.integrations.diffusers import enable

    assert enable() == "fastdit"
    assert enable("torch") == "fastdit_torch"
    with pytest.raises(ValueError, match="unknown fastdit backend 'trition'"):
        enable("trition")


@pytest.mark.bad_input
def test_strided_and_offset_views_give_the_contiguous_result():
    """diffusers hands the backend transposed views of its projections (B, S, H, D strided as
    (B, H, S, D)) and sliced masks: catches the packed path reading a view's storage as dense (the
    gather of kept keys, the query reshape) or a mask view's offset ignored."""
    keep = _padding()
    q, k, v = _qkv()
    want = fastdit_attention(q, k, v, attn_mask=keep[:, None, None, :], backend="torch")
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]  # strides of (B, H, S, D)
    assert not views[0].is_contiguous()
    offset_mask = torch.cat([torch.ones(1, SK, dtype=torch.bool), keep])[1:]  # storage offset SK
    got = fastdit_attention(*views, attn_mask=offset_mask[:, None, None, :], backend="torch")
    assert torch.equal(got, want)


@pytest.mark.parametrize("seq_k", [16, 24, 10])  # 16, 24: read eight keys per int64 word; 10: bool by bool
def test_row_structure_reads_words_and_bools_alike(seq_k):
    """Catches the word-packed reading of a boolean mask (eight keys per int64) disagreeing with
    the plain one: a row differing from the first valid row in one key of one word, a sample with
    no valid row, and a row that differs only past the last full word."""
    from fastdit.integrations.diffusers import _row_structure

    gen = torch.Generator().manual_seed(0)
    valid_k = torch.rand(3, seq_k, generator=gen) > 0.3
    valid_q = torch.tensor([[True, False, True, True, False, True]] * 2 + [[False] * 6])
    keep = valid_q[:, :, None] & valid_k[:, None, :]
    keep[0, 3, seq_k - 1] = ~keep[0, 3, seq_k - 1]  # one key of one row, in the last word
    keep[2] = False
    strided = torch.zeros(3, 6, seq_k + 1, dtype=torch.bool)[..., :seq_k]  # no int64 view possible
    strided.copy_(keep)
    for mask in (keep, strided):
        rows, first, same = _row_structure(mask)
        assert torch.equal(rows, keep.any(dim=2))
        assert torch.equal(first[:2], keep[:2, 0]) and not first[2].any()
        want = (keep == first[:, None, :]).all(dim=2)
        assert torch.equal(same, want) and not bool(same[0, 3])

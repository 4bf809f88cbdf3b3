"""The vendor attention providers (fastdit.ops.attention_providers).

No GPU and no flash-attn / xformers wheel exist on the CPU machine, so the CPU tests prove the
wiring: the aten calls against the installed torch's own schemas and meta kernels (argument order,
LSE layouts, GQA folding), and the flash-attn / xformers adapters against stand-in packages that
implement those packages' documented contracts in float64. The ``gpu`` tests run every provider
that the GPU machine has for parity, forward and backward."""

import importlib.machinery
import sys
import types

import pytest
import torch

from fastdit import ops
from fastdit.ops import attention_providers as providers
from fastdit.ops import dispatch
from fastdit.reference.attention import (
    attention_bwd_ref,
    attention_ref,
    varlen_attention_bwd_ref,
    varlen_attention_ref,
)
from tests.conftest import rel_err

# ---- the torch kernels: argument order and layouts against the installed torch's meta kernels ----

DENSE = {
    "sdpa_flash": (providers._dense_sdpa_flash, providers._dense_bwd_sdpa_flash),
    "cudnn": (providers._dense_cudnn, providers._dense_bwd_cudnn),
    "sdpa_efficient": (providers._dense_efficient, providers._dense_bwd_efficient),
}


@pytest.mark.parametrize("name", list(DENSE))
@pytest.mark.parametrize("heads_k", [4, 1])
@pytest.mark.parametrize("seq_q", [70, 64])
def test_torch_kernel_calls_fit_the_installed_schemas(name, heads_k, seq_q):
    """Catches: an argument in the wrong slot (the aten op raises), the memory-efficient LSE's
    padded rows (a multiple of 32) returned unsliced, cuDNN's (B, H, S, 1) LSE not reshaped, and
    GQA gradients not folded back onto the K / V heads."""
    forward, backward = DENSE[name]
    q = torch.empty(2, seq_q, 4, 64, device="meta", dtype=torch.bfloat16)
    k = v = torch.empty(2, seq_q, heads_k, 64, device="meta", dtype=torch.bfloat16)
    out, lse = forward(q, k, v, 0.125, False)
    assert out.shape == q.shape and lse.shape == (2, 4, seq_q) and lse.dtype == torch.float32
    grads = backward(out, q, k, v, out, lse, 0.125, False)
    assert [tuple(g.shape) for g in grads] == [tuple(q.shape), tuple(k.shape), tuple(v.shape)]


@pytest.mark.parametrize("heads_k", [4, 2])
def test_torch_flash_varlen_call_fits_the_installed_schema(heads_k):
    """Catches the varlen form's LSE layout (flash-attn's (H, total)) or its GQA grads going wrong."""
    q = torch.empty(100, 4, 64, device="meta", dtype=torch.float16)
    k = v = torch.empty(90, heads_k, 64, device="meta", dtype=torch.float16)
    cu_q, cu_k = (torch.empty(3, device="meta", dtype=torch.int32) for _ in range(2))
    out, lse = providers._flash_forward(q, k, v, cu_q, cu_k, 60, 50, 0.1, True)
    assert out.shape == q.shape and lse.shape == (4, 100)
    grads = providers._flash_backward(out, q, k, v, out, lse, cu_q, cu_k, 60, 50, 0.1, True)
    assert [tuple(g.shape) for g in grads] == [tuple(q.shape), tuple(k.shape), tuple(v.shape)]


def test_empty_rows_keep_fastdits_minus_inf_and_flash_gets_plus_inf_back():
    """Catches FlashAttention's +inf LSE of a row that sees no key leaking out (a ring merge would
    then weight it infinitely), or -inf reaching its backward (exp(s - lse) would be NaN)."""
    lse = torch.tensor([1.0, float("inf"), float("-inf")])
    assert providers._empty_rows_to_minus_inf(lse).tolist() == [1.0, float("-inf"), float("-inf")]
    assert providers._empty_rows_to_plus_inf(torch.tensor([1.0, float("-inf")])).tolist() == [1.0, float("inf")]


def test_providers_are_registered_for_both_ops_with_a_backward_form():
    """Catches a provider missing from one op (auto would then mix kernels between dense and
    packed calls) or without the explicit backward ring attention calls."""
    for op in ("attention", "varlen_attention"):
        table = dispatch.backends(op)
        for name in providers.PROVIDERS:
            assert name in table and table[name].devices == ("cuda",)
        assert dispatch.priority(op)[: len(providers.PROVIDERS)] == list(providers.ATTENTION_PRIORITY[:5])
    for name in providers.PROVIDERS:
        assert dispatch.backends("varlen_attention")[name].backward is not None


def test_unavailable_providers_say_why():
    """Catches a provider that silently claims to be available on a torch without CUDA."""
    for name in providers.PROVIDERS:
        reason = dispatch.backends("attention")[name].unavailable
        if torch.version.cuda is None:
            assert reason and "without CUDA" in reason
    for name, pip_name in (("flash_attn", "flash-attn"), ("xformers", "xformers")):
        if providers._package_missing(name, pip_name):
            assert f"pip install {pip_name}" in dispatch.backends("attention")[name].unavailable


# ---- flash-attn and xformers: stand-in packages with their documented contracts -------------------


def _module(name: str) -> types.ModuleType:
    """An importable-looking module (importlib.util.find_spec reads its __spec__)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def _as_flash_lse(lse):
    return lse.masked_fill(torch.isneginf(lse), float("inf"))  # flash-attn: +inf for a row with no key


def _from_flash_lse(lse):
    return lse.masked_fill(torch.isposinf(lse), float("-inf"))


def _fake_flash_attn(version: str):
    """flash_attn.flash_attn_interface as of 2.6 (``window_size``) or 2.7 (``window_size_left`` /
    ``_right``, ``softcap``): forward functions with ``return_attn_probs`` and the private backward
    functions ring attention implementations call, in float64 through fastdit's reference."""
    module = _module("flash_attn.flash_attn_interface")
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False,
                               block_table=None):  # fmt: skip
        assert dropout_p == 0.0 and q.shape[1] % k.shape[1] == 0
        out, lse = varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale, causal=causal)
        calls.append("varlen_fwd")
        return (out, _as_flash_lse(lse), None) if return_attn_probs else out

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, deterministic=False, return_attn_probs=False):  # fmt: skip
        out, lse = attention_ref(q, k, v, softmax_scale=softmax_scale, causal=causal)
        calls.append("dense_fwd")
        return (out, _as_flash_lse(lse), None) if return_attn_probs else out

    def check_options(dropout_p, window, softcap, alibi_slopes, deterministic):
        assert dropout_p == 0.0 and tuple(window) == (-1, -1) and softcap == 0.0 and alibi_slopes is None
        assert deterministic is False

    def varlen_grads(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
        assert not torch.isneginf(softmax_lse).any()
        grads = varlen_attention_bwd_ref(dout, q, k, v, out, _from_flash_lse(softmax_lse), cu_seqlens_q,
                                         cu_seqlens_k, softmax_scale=softmax_scale, causal=causal)  # fmt: skip
        for target, grad in zip((dq, dk, dv), grads):
            target.copy_(grad)
        calls.append("varlen_bwd")

    def dense_grads(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal):
        grads = attention_bwd_ref(dout, q, k, v, out, _from_flash_lse(softmax_lse), softmax_scale=softmax_scale,
                                  causal=causal)  # fmt: skip
        for target, grad in zip((dq, dk, dv), grads):
            target.copy_(grad)
        calls.append("dense_bwd")

    if version == "2.6":

        def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                        max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                        softcap, alibi_slopes, deterministic, rng_state=None):  # fmt: skip
            check_options(dropout_p, window_size, softcap, alibi_slopes, deterministic)
            varlen_grads(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)

        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size, softcap, alibi_slopes, deterministic, rng_state=None):  # fmt: skip
            check_options(dropout_p, window_size, softcap, alibi_slopes, deterministic)
            dense_grads(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
    else:

        def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                        max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                                        window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                                        rng_state=None, zero_tensors=False):  # fmt: skip
            check_options(dropout_p, (window_size_left, window_size_right), softcap, alibi_slopes, deterministic)
            varlen_grads(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)

        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                                 rng_state=None):  # fmt: skip
            check_options(dropout_p, (window_size_left, window_size_right), softcap, alibi_slopes, deterministic)
            dense_grads(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)

    for fn in (flash_attn_varlen_func, flash_attn_func, _flash_attn_varlen_backward, _flash_attn_backward):
        setattr(module, fn.__name__, fn)
    return module, calls


def _fake_flash_attn3():
    """FlashAttention-3's ``flash_attn_interface`` (hopper/ build): ``return_attn_probs`` gives
    ``(out, lse)``, and one private ``_flash_attn_backward`` serves dense and varlen calls, its
    ``cu_seqlens`` / ``sequed`` arguments None for dense ones."""
    module = _module("flash_attn_interface")
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                               seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                               k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                               num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
                               return_attn_probs=False):  # fmt: skip
        out, lse = varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale, causal=causal)
        calls.append("varlen_fwd")
        return (out, _as_flash_lse(lse)) if return_attn_probs else out

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                        pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):  # fmt: skip
        out, lse = attention_ref(q, k, v, softmax_scale=softmax_scale, causal=causal)
        calls.append("dense_fwd")
        return (out, _as_flash_lse(lse)) if return_attn_probs else out

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k,
                             max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale, causal, window_size_left=-1,
                             window_size_right=-1, softcap=0.0, deterministic=False, sm_margin=0):  # fmt: skip
        assert sequed_q is None and sequed_k is None and softcap == 0.0
        lse = _from_flash_lse(softmax_lse)
        if cu_seqlens_q is None:
            grads = attention_bwd_ref(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal)
        else:
            grads = varlen_attention_bwd_ref(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                             softmax_scale=softmax_scale, causal=causal)  # fmt: skip
        for target, grad in zip((dq, dk, dv), grads):
            target.copy_(grad)
        calls.append("dense_bwd" if cu_seqlens_q is None else "varlen_bwd")
        return dq, dk, dv

    for fn in (flash_attn_varlen_func, flash_attn_func, _flash_attn_backward):
        setattr(module, fn.__name__, fn)
    return module, calls


def _fake_xformers():
    """xformers.ops.fmha: memory_efficient_attention_forward_requires_grad / _backward in the BMHK
    layout with equal head counts, an LSE padded to 32 rows (as its CUTLASS kernel pads), and the
    two biases fastdit uses, in float64 through fastdit's reference."""
    fmha = _module("xformers.ops.fmha")
    bias_module = _module("xformers.ops.fmha.attn_bias")
    calls = []

    class LowerTriangularFromBottomRightMask:
        pass

    class BlockDiagonalMask:
        def __init__(self, q, k, causal=False):
            self.q_seqlen, self.kv_seqlen, self.causal = q, k, causal

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None):
            return cls(list(q_seqlen), list(kv_seqlen if kv_seqlen is not None else q_seqlen))

        def make_causal_from_bottomright(self):
            return BlockDiagonalMask(self.q_seqlen, self.kv_seqlen, causal=True)

    def cu(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    def plan(attn_bias):
        if isinstance(attn_bias, BlockDiagonalMask):
            return cu(attn_bias.q_seqlen), cu(attn_bias.kv_seqlen), attn_bias.causal
        return None, None, isinstance(attn_bias, LowerTriangularFromBottomRightMask)

    def memory_efficient_attention_forward_requires_grad(query, key, value, attn_bias=None, p=0.0, scale=None, *,
                                                         op=None, output_dtype=None):  # fmt: skip
        assert p == 0.0 and query.shape[2] == key.shape[2], "xformers' BMHK kernels take equal head counts"
        cu_q, cu_k, causal = plan(attn_bias)
        if cu_q is None:
            out, lse = attention_ref(query, key, value, softmax_scale=scale, causal=causal)
        else:
            assert query.shape[0] == 1
            out, lse = varlen_attention_ref(query[0], key[0], value[0], cu_q, cu_k, softmax_scale=scale, causal=causal)
            out, lse = out[None], lse[None]
        calls.append("fwd")
        pad = -lse.shape[-1] % 32
        return out, torch.cat([lse, lse.new_full((*lse.shape[:-1], pad), 7.0)], dim=-1)

    def memory_efficient_attention_backward(grad, output, lse, query, key, value, attn_bias=None, p=0.0, scale=None,
                                            *, op=None):  # fmt: skip
        assert query.shape[2] == key.shape[2]
        cu_q, cu_k, causal = plan(attn_bias)
        lse = lse[..., : query.shape[1]]
        if cu_q is None:
            grads = attention_bwd_ref(grad, query, key, value, output, lse, softmax_scale=scale, causal=causal)
        else:
            grads = varlen_attention_bwd_ref(grad[0], query[0], key[0], value[0], output[0], lse[0], cu_q, cu_k,
                                             softmax_scale=scale, causal=causal)  # fmt: skip
            grads = tuple(g[None] for g in grads)
        calls.append("bwd")
        return grads

    fmha.memory_efficient_attention_forward_requires_grad = memory_efficient_attention_forward_requires_grad
    fmha.memory_efficient_attention_backward = memory_efficient_attention_backward
    bias_module.LowerTriangularFromBottomRightMask = LowerTriangularFromBottomRightMask
    bias_module.BlockDiagonalMask = BlockDiagonalMask
    fmha.attn_bias = bias_module
    return {"xformers.ops.fmha": fmha, "xformers.ops.fmha.attn_bias": bias_module}, calls


def _float64_reference(q, k, v, cu_q, cu_k, scale, causal):
    return varlen_attention_ref(*(t.double() for t in (q, k, v)), cu_q, cu_k, softmax_scale=scale, causal=causal)


def _packed(lengths_q, lengths_k, heads, heads_k, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), heads, dim, generator=gen, requires_grad=True)
    k, v = (torch.randn(sum(lengths_k), heads_k, dim, generator=gen, requires_grad=True) for _ in range(2))
    cu = [torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32) for n in (lengths_q, lengths_k)]
    return q, k, v, *cu


def _check_varlen_provider(ops_of, q, k, v, cu_q, cu_k, causal, tolerance=1e-5):
    """Forward (out, LSE), autograd and the explicit backward of one provider's custom ops."""
    scale = 0.3
    max_q, max_k = int(cu_q.diff().max()), int(cu_k.diff().max())
    out, lse = ops_of["varlen_attention"](q, k, v, cu_q, cu_k, max_q, max_k, scale, causal)
    want_out, want_lse = _float64_reference(q, k, v, cu_q, cu_k, scale, causal)
    assert rel_err(out, want_out) <= tolerance
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))  # rows with no key: -inf, never +inf
    seen = torch.isfinite(want_lse)
    assert rel_err(lse[seen], want_lse[seen]) <= tolerance
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = varlen_attention_bwd_ref(dout.double(), *(t.detach().double() for t in (q, k, v)), want_out, want_lse,
                                    cu_q, cu_k, softmax_scale=scale, causal=causal)  # fmt: skip
    for got, expected in zip(grads, want):
        assert rel_err(got, expected) <= tolerance
    explicit = ops_of["varlen_attention_backward"](dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu_q,
                                                   cu_k, max_q, max_k, scale, causal)  # fmt: skip
    for got, expected in zip(explicit, want):
        assert rel_err(got, expected) <= tolerance


CASES = [  # (query lengths, key lengths, heads, kv heads, head dim, causal)
    ([7, 12, 3], [7, 12, 3], 4, 4, 16, False),
    ([7, 12, 3], [7, 12, 3], 4, 2, 16, True),  # GQA, causal
    ([9, 4], [5, 11], 4, 1, 24, True),  # MQA, Lq != Lk: rows of the first sample see no key
]


@pytest.mark.parametrize("version", ["2.6", "2.7"])
@pytest.mark.parametrize("case", CASES)
def test_flash_attn_provider_against_its_documented_contract(monkeypatch, version, case):
    """Catches: the LSE not requested (return_attn_probs), its +inf rows not mapped to -inf, a
    backward keyword that one flash-attn release renamed (window_size -> window_size_left / _right)
    passed under the wrong name, or a gradient buffer left unwritten."""
    module, calls = _fake_flash_attn(version)
    monkeypatch.setitem(sys.modules, "flash_attn", _module("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", module)
    lengths_q, lengths_k, heads, heads_k, dim, causal = case
    _check_varlen_provider(providers.FLASH_ATTN, *_packed(lengths_q, lengths_k, heads, heads_k, dim), causal)
    assert calls == ["varlen_fwd", "varlen_bwd", "varlen_bwd"]


@pytest.mark.parametrize("case", CASES)
def test_flash_attn3_interface_is_served_where_flash_attn2_is_missing(monkeypatch, case):
    """Catches FA3's interface (one backward for dense and varlen, (out, lse) returned) being
    called like FA2's, or dense calls passing cu_seqlens it would read as varlen."""
    module, calls = _fake_flash_attn3()
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    monkeypatch.setattr(importlib.util, "find_spec", _specs_without("flash_attn"))
    lengths_q, lengths_k, heads, heads_k, dim, causal = case
    _check_varlen_provider(providers.FLASH_ATTN, *_packed(lengths_q, lengths_k, heads, heads_k, dim), causal)
    q = torch.randn(2, 9, 4, 16, requires_grad=True)
    out, lse = providers.FLASH_ATTN["attention"](q, q, q, 0.25, False)
    want, _ = attention_ref(q.detach().double(), q.detach().double(), q.detach().double(), softmax_scale=0.25)
    assert rel_err(out, want) <= 1e-5
    out.sum().backward()
    assert calls == ["varlen_fwd", "varlen_bwd", "varlen_bwd", "dense_fwd", "dense_bwd"]


def _specs_without(missing: str):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == missing or name.startswith(missing + ".") else real(name, *args)

    return find_spec


@pytest.mark.parametrize("version", ["2.6", "2.7"])
def test_flash_attn_provider_dense_form(monkeypatch, version):
    """Catches the dense functions (flash_attn_func / _flash_attn_backward) being wired like the
    varlen ones (a cu_seqlens keyword the dense backward does not take)."""
    module, calls = _fake_flash_attn(version)
    monkeypatch.setitem(sys.modules, "flash_attn", _module("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", module)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 9, 4, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 6, 2, 16, generator=gen, requires_grad=True) for _ in range(2))
    out, lse = providers.FLASH_ATTN["attention"](q, k, v, 0.25, True)
    want_out, want_lse = attention_ref(*(t.double() for t in (q, k, v)), softmax_scale=0.25, causal=True)
    assert rel_err(out, want_out) <= 1e-5 and torch.isneginf(lse[:, :, :3]).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want = attention_bwd_ref(torch.ones_like(want_out), *(t.detach().double() for t in (q, k, v)), want_out, want_lse,
                             softmax_scale=0.25, causal=True)  # fmt: skip
    assert all(rel_err(g, w) <= 1e-5 for g, w in zip(grads, want))
    assert calls == ["dense_fwd", "dense_bwd"]


@pytest.mark.parametrize("case", CASES)
def test_xformers_provider_against_its_documented_contract(monkeypatch, case):
    """Catches: K / V heads not repeated for GQA (xformers' BMHK kernels take equal counts), the
    padded LSE rows kept, the block-diagonal mask built from the wrong lengths, causal not from
    the bottom right."""
    modules, calls = _fake_xformers()
    monkeypatch.setitem(sys.modules, "xformers", _module("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", _module("xformers.ops"))
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    lengths_q, lengths_k, heads, heads_k, dim, causal = case
    _check_varlen_provider(providers.XFORMERS, *_packed(lengths_q, lengths_k, heads, heads_k, dim), causal)
    assert calls == ["fwd", "bwd", "bwd"]


# ---- on the GPU: every provider the machine has, forward and backward ------------------------------


def _available(op):
    return [n for n in providers.PROVIDERS if dispatch.backends(op)[n].unavailable is None]


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [128, 64])
def test_vendor_providers_cuda_bf16_parity(dim):
    """Every installed provider on bf16 packed samples (GQA; causal where the provider takes it;
    Lq != Lk cross-attention): output, LSE, autograd and explicit-backward gradients against float64,
    within bf16's rounding. Catches a wrong aten argument, LSE layout or GQA fold on real kernels."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    names = _available("varlen_attention")
    assert names, "no vendor attention provider on this GPU"
    for name in names:
        ops_of = {"sdpa_flash": providers.SDPA_FLASH, "cudnn": providers.CUDNN,
                  "sdpa_efficient": providers.SDPA_EFFICIENT, "flash_attn": providers.FLASH_ATTN,
                  "xformers": providers.XFORMERS}[name]  # fmt: skip
        cases = [([300, 77, 512], [300, 77, 512], 8, 2, True), ([300, 77], [120, 64], 8, 8, False)]
        if name in ("sdpa_flash", "flash_attn"):  # bottom-right causal with Lq > Lk: rows that see no key
            cases.append(([90, 40], [30, 40], 4, 4, True))
        for lengths_q, lengths_k, heads, heads_k, causal in cases:
            q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, heads, heads_k, dim)
            q, k, v = (t.detach().to(device, torch.bfloat16).requires_grad_() for t in (q, k, v))
            cu_q, cu_k = cu_q.to(device), cu_k.to(device)
            _check_varlen_provider(ops_of, q, k, v, cu_q, cu_k, causal, tolerance=2e-2)


@pytest.mark.gpu
def test_auto_runs_a_vendor_provider_on_the_gpu_without_a_policy():
    """Catches the unmeasured Triton kernel (or the reference) being the GPU default."""
    q = torch.randn(2, 256, 8, 128, device="cuda", dtype=torch.bfloat16)
    with dispatch.trace() as log:
        ops.attention(q, q, q)
    (pair,) = log
    assert pair[1] in providers.PROVIDERS, log
    assert log.sources[pair] in ("priority",) or log.sources[pair].startswith("policy: ")


@pytest.mark.gpu
def test_vendor_providers_propagate_a_nan_query_row():
    """A NaN in one query row gives that row NaN (the reference's result) and leaves the others
    finite. Catches a kernel whose running max skips NaN scores (torch's CPU flash kernel does:
    fastdit's torch backend restores the NaN) returning a finite, wrong row."""
    device = torch.device("cuda")
    q, k, v, cu_q, cu_k = (t.detach().to(device) for t in _packed([64, 80], [64, 80], 4, 4, 64))
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    q[70, 2, 5] = float("nan")
    for name in _available("varlen_attention"):
        out = ops.varlen_attention(q, k, v, cu_q, cu_k, 80, 80, backend=name)
        assert out[70, 2].isnan().all(), name
        assert torch.isfinite(out[:70]).all() and torch.isfinite(out[71:]).all() and torch.isfinite(out[70, :2]).all()

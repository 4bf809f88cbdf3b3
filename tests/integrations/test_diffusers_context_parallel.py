"""diffusers' own context parallelism (``enable_parallelism`` with Ulysses, Ring, and both) running
the fastdit attention backend, on 2 and 4 CPU ranks over gloo, against the single-process model:
forward output and input gradients. No other diffusers backend runs Ring on a CPU (none returns
the log-sum-exp there); fastdit's does.

diffusers' ``enable_parallelism`` picks ``rank % torch.accelerator.device_count()`` as the device,
which divides by zero on CPU-only torch: the ranks report one accelerator (the device type stays
"cpu"), the one workaround these tests need.
"""

import os
import re
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

diffusers = pytest.importorskip("diffusers", reason="needs `pip install -e .[diffusers]`")

from fastdit.integrations import _diffusers_registry as registry  # noqa: E402
from fastdit.integrations.diffusers import attention_with_lse, enable, register_attention_backend  # noqa: E402
from fastdit.ops import dispatch  # noqa: E402
from tests.conftest import rel_err  # noqa: E402

VERSION = tuple(int(n) for n in re.findall(r"\d+", diffusers.__version__)[:2])
# diffusers 0.36's templated CP (every backend): Ring's backward returns 11 gradients for 12
# inputs, Ulysses' backward assumes S_kv == S_q (cross-attention fails), Ulysses x Ring is refused.
# There only the forward of Ulysses and Ring is checked; the newest (0.42) runs everything.
FULL = VERSION >= (0, 42)
# diffusers 0.42's Ring backward passes each gradient accumulator to the next rank while that rank
# works on the previous rank's key block: right for 2 ranks, wrong for more with every backend
# (reversing the rotation makes fastdit's Ring 4 gradients equal one process). Ring 4: forward.
RING_BACKWARD_MAX = 2


def _model():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                  rope_max_seq_len=32)  # fmt: skip
    with torch.no_grad():  # diffusers zero-initialises the output projection
        for p in model.parameters():
            if not p.abs().any():
                p.normal_(0, 0.05)
    return model


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 2, 8, 8, generator=gen), torch.tensor([500.0]), torch.randn(1, 8, 32, generator=gen)


def _rank(rank, world, port, configs, backend, queue):
    try:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        torch.set_num_threads(1)
        torch.accelerator.device_count = lambda: 1  # see the module docstring
        from diffusers import ContextParallelConfig

        name = enable(backend)
        latents, timestep, text = _inputs()
        results = []
        for ulysses, ring, backward in configs:
            single = _model()
            x = latents.clone().requires_grad_(backward)
            expect = single(x, timestep, text, return_dict=False)[0]
            if backward:
                expect.square().sum().backward()
            model = _model()
            model.set_attention_backend(name)
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
            y = latents.clone().requires_grad_(backward)
            with dispatch.trace() as log:
                out = model(y, timestep, text, return_dict=False)[0]
            served = sum(op == "attention" and not ran.startswith("fallback") for op, ran in log)
            grad_err = None
            if backward:
                out.square().sum().backward()
                grad = y.grad.clone()
                dist.all_reduce(grad)  # each rank holds the gradient of its own sequence shard
                grad_err = rel_err(grad, x.grad)
            results.append((ulysses, ring, rel_err(out.detach(), expect.detach()), grad_err, served))
        queue.put((rank, "ok", results))
    except BaseException:  # noqa: BLE001 - the test shows every rank's traceback
        queue.put((rank, traceback.format_exc(), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(target, world, *args) -> list:
    """Run ``target(rank, world, port, *args, queue)`` on ``world`` ranks forked from one server
    that imported torch, diffusers and fastdit once; returns each rank's result, raising with the
    tracebacks of ranks that failed."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    try:
        replies = sorted(queue.get(timeout=300) for _ in range(world))
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    failed = [f"rank {rank}:\n{status}" for rank, status, _ in replies if status != "ok"]
    assert not failed, "\n".join(failed)
    return [results for _, _, results in replies]


def _world(world, configs, backend=None):
    return _spawn(_rank, world, configs, backend)


def _configs(*layouts):
    """(ulysses, ring, with backward) for each layout diffusers can run here (see above)."""
    return [(u, r, FULL and r <= RING_BACKWARD_MAX) for u, r in layouts if FULL or min(u, r) == 1]


WORLDS = {2: _configs((2, 1), (1, 2)), 4: _configs((2, 2), (4, 1), (1, 4))}


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_and_ring_with_the_fastdit_backend_equal_one_process(world):
    """Catches a log-sum-exp in the wrong layout or base (Ring's merge would weight the blocks
    wrongly), a backward that ignores the global out / lse a ring step passes (each block's share
    of the gradient), heads or sequence shards swapped by the all-to-all, and a call that left
    fastdit (the trace counts its attention ops)."""
    for results in _world(world, WORLDS[world]):
        for ulysses, ring, out_err, grad_err, served in results:
            where = f"ulysses={ulysses} ring={ring}"
            assert served > 0, where
            assert out_err <= 1e-5, f"{where}: output {out_err}"
            assert grad_err is None or grad_err <= 1e-5, f"{where}: input gradient {grad_err}"


# Transformers besides Wan whose diffusers CP plan runs on the tiny configs: Ulysses 2, forward.
# (LTX-2's plan fails inside diffusers' RoPE at this size, Helios' names a block the tiny model lacks,
# QwenImage's needs a text length divisible by the ranks.)
ULYSSES_MODELS = ["LTXVideoTransformer3DModel", "MiniMaxH3Transformer3DModel", "FluxTransformer2DModel",
                  "ChronoEditTransformer3DModel"]  # fmt: skip


def _models_rank(rank, world, port, classes, queue):
    try:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        torch.set_num_threads(1)
        torch.accelerator.device_count = lambda: 1  # see the module docstring
        from diffusers import ContextParallelConfig

        from tests.integrations.tiny_diffusers import MODELS, build, inputs

        results = {}
        for cls in classes:
            spec = next(m for m in MODELS if m.cls == cls)
            kwargs = inputs(spec)
            with torch.no_grad():
                expect = build(spec)(**kwargs, return_dict=False)[0]
                model = build(spec)
                model.set_attention_backend(enable())
                model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
                with dispatch.trace() as log:
                    got = model(**kwargs, return_dict=False)[0]
            results[cls] = (rel_err(got, expect), [op for op, _ in log].count("varlen_attention"), len(log))
        queue.put((rank, "ok", results))
    except BaseException:  # noqa: BLE001
        queue.put((rank, traceback.format_exc(), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(not FULL, reason="these transformers' CP plans need the newest diffusers")
def test_ulysses_on_other_transformers_with_a_diffusers_plan_equals_one_process():
    """LTX-Video (text-padding masks, per head, under Ulysses: each rank holds half the heads of
    a [B, H, 1, Sk] mask), MiniMax-H3, Flux, ChronoEdit: catches a mask refused or misread after
    the head split, and any model whose plan routes attention around fastdit."""
    for results in _spawn(_models_rank, 2, ULYSSES_MODELS):
        for cls, (err, varlen, calls) in results.items():
            assert err <= 1e-5 and calls > 0, (cls, err, calls)
            assert (varlen > 0) == (cls == "LTXVideoTransformer3DModel"), (cls, varlen)


def test_ring_on_the_reference_backend_equals_one_process():
    """The same on fastdit's float-math reference backend (no torch kernel shared with the
    single-process run)."""
    for results in _world(2, _configs((1, 2)), backend="reference"):
        for *_, out_err, grad_err, served in results:
            assert served > 0 and out_err <= 1e-5 and (grad_err is None or grad_err <= 1e-5)


def test_the_backend_registers_with_context_parallel_support_and_returns_the_lse():
    """Catches the registration without supports_context_parallel (diffusers' enable_parallelism
    refuses the backend) and an LSE in the wrong base, layout or scale."""
    member = register_attention_backend()
    assert registry.supports_context_parallel(member)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=gen) for _ in range(3))
    out, lse = attention_with_lse(q, k, v, scale=0.3)
    logits = torch.einsum("bqhd,bkhd->bqhk", q.double(), k.double()) * 0.3
    assert lse.shape == (2, 5, 3) and rel_err(lse, torch.logsumexp(logits, dim=-1)) <= 1e-6
    want = torch.einsum("bqhk,bkhd->bqhd", logits.softmax(dim=-1), v.double())
    assert rel_err(out, want) <= 1e-6


def test_a_key_padding_mask_with_the_lse_equals_sdpa_and_its_lse():
    """Catches the LSE of a padded call computed over the padded keys too, a sample with no kept
    key given NaN instead of out 0 / lse -inf, and the padded keys' gradient rows left non-zero
    (the backward op on a key-padding mask, as Ulysses runs it)."""
    from types import SimpleNamespace

    from fastdit.integrations.diffusers import _cp_backward_op, _cp_forward_op

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 5, 2, 8, generator=gen) for _ in range(3))
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1, 3:] = False
    keep[2] = False
    mask = keep[:, None, None, :]
    out, lse = attention_with_lse(q, k, v, attn_mask=mask)
    logits = torch.einsum("bqhd,bkhd->bqhk", q.double(), k.double()) / 8**0.5
    logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    want_lse = torch.logsumexp(logits, dim=-1)
    assert rel_err(lse[:2], want_lse[:2]) <= 1e-6 and bool(torch.isneginf(lse[2]).all())
    want = torch.einsum("bqhk,bkhd->bqhd", logits[:2].softmax(dim=-1), v[:2].double())
    assert rel_err(out[:2], want) <= 1e-6 and not out[2].any()
    # the backward op against autograd through SDPA on the same mask
    ctx = SimpleNamespace(save_for_backward=lambda *t: setattr(ctx, "saved_tensors", t))
    _cp_forward_op(ctx, q, k, v, attn_mask=mask, backend="reference")
    grad = torch.randn(out.shape, generator=gen)
    dq, dk, dv = _cp_backward_op(ctx, grad)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), attn_mask=mask)
    sdpa.transpose(1, 2).mul(grad).sum().backward()
    for got, leaf in zip((dq, dk, dv), leaves):
        assert rel_err(got, leaf.grad) <= 1e-5
    assert not dk[1, 3:].any() and not dk[2].any()


@pytest.mark.bad_input
def test_what_context_parallelism_cannot_serve_is_refused_by_name():
    """Catches a mask other than key padding, or a top-left causal call, run with a wrong
    log-sum-exp (Ring would merge garbage), and a mask under Ring (diffusers passes each key block
    the whole mask)."""
    from types import SimpleNamespace

    from fastdit.integrations.diffusers import _context_parallel

    q = torch.randn(1, 4, 2, 8)
    rows = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    with pytest.raises(dispatch.BackendNotSupportedError, match="distinct query rows|differs between queries"):
        attention_with_lse(q, q, q, attn_mask=rows)
    with pytest.raises(dispatch.BackendNotSupportedError, match="causal attention with S != S_kv"):
        attention_with_lse(q, torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8), is_causal=True)
    with pytest.raises(ValueError, match="dropout_p"):
        attention_with_lse(q, q, q, dropout_p=0.1)
    ring = SimpleNamespace(context_parallel_config=SimpleNamespace(ring_degree=2, ulysses_degree=1))
    with pytest.raises(dispatch.BackendNotSupportedError, match="Ring context parallelism: an attn_mask"):
        _context_parallel(q, q, q, torch.ones(1, 1, 1, 4, dtype=torch.bool), 0.0, False, None, False, False, ring, None)


# ---- para-attn: its modes parallelize torch SDPA calls, which fastdit's backend replaces ----------------


class _ParaAttnLike(torch.overrides.TorchFunctionMode):
    """Stands in for para-attn's UlyssesAttnMode where para-attn is not installed: a mode from a
    ``para_attn`` module that takes the SDPA calls (and, like para-attn, an ``attn_func``)."""

    def __init__(self, attn_func=None):
        super().__init__()
        self._attn_func, self.calls = attn_func, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls += 1
            return (self._attn_func or func)(*args, **kwargs)
        return func(*args, **kwargs)


_ParaAttnLike.__module__ = "para_attn.para_attn_interface"


def test_under_para_attn_the_call_goes_to_its_mode_and_is_reported():
    """Catches fastdit serving a call para-attn must parallelize (each rank would attend over its
    own shard: silently wrong), a silent hand-over, strict mode ignored, and a report where
    para-attn was given fastdit as its attention function."""
    from fastdit import settings
    from fastdit.integrations.diffusers import fastdit_attention, sdpa_on_fastdit

    q, k, v = (torch.randn(2, 6, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    want = fastdit_attention(q, k, v, backend="reference")
    before = sum(n for (_, _, why), n in dispatch.fallbacks().items() if "para-attn" in why)
    with _ParaAttnLike() as mode, dispatch.trace() as log:
        got = fastdit_attention(q, k, v, backend="torch")
    assert mode.calls == 1 and ("attention", "fallback:para-attn") in log
    assert sum(n for (_, _, why), n in dispatch.fallbacks().items() if "para-attn" in why) == before + 1
    assert rel_err(got, want) <= 1e-5
    with settings.override(strict=True), _ParaAttnLike(), pytest.raises(dispatch.BackendNotSupportedError):
        fastdit_attention(q, k, v, backend="torch")
    with _ParaAttnLike(attn_func=sdpa_on_fastdit) as mode, dispatch.trace() as log:
        got = fastdit_attention(q, k, v, backend="torch")
    assert mode.calls == 1 and log == [("attention", "torch")]  # para-attn's hand-off, then fastdit
    assert rel_err(got, want) <= 1e-5


def _para_attn_rank(rank, world, port, attn_func, queue):
    try:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        torch.set_num_threads(1)
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from para_attn.para_attn_interface import UlyssesAttnMode
        from torch.distributed.device_mesh import init_device_mesh

        from fastdit.integrations.diffusers import sdpa_on_fastdit

        mesh = init_device_mesh("cpu", (world,))
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 4 * world, 4, 16, generator=gen) for _ in range(3))
        want = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        shard = slice(rank * 4, rank * 4 + 4)
        with UlyssesAttnMode(mesh, attn_func=sdpa_on_fastdit if attn_func else None), dispatch.trace() as log:
            out = dispatch_attention_fn(
                q[:, shard], k[:, shard], v[:, shard], backend=register_attention_backend("torch")
            )
        queue.put((rank, "ok", (rel_err(out, want.transpose(1, 2)[:, shard]), log)))
    except BaseException:  # noqa: BLE001
        queue.put((rank, traceback.format_exc(), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("attn_func", [False, True], ids=["para-attn's SDPA", "attn_func=sdpa_on_fastdit"])
def test_para_attn_ulysses_with_the_fastdit_backend_equals_one_process(attn_func):
    """With para-attn installed (not a fastdit dependency; skipped otherwise): its Ulysses mode over
    2 gloo ranks around a diffusers dispatcher call on the fastdit backend gives each rank its
    shard of full attention, served by fastdit when para-attn is given ``sdpa_on_fastdit``."""
    pytest.importorskip("para_attn", reason="para-attn is not installed")
    for err, log in _spawn(_para_attn_rank, 2, attn_func):
        assert err <= 1e-5
        assert (("attention", "torch") in log) == attn_func
